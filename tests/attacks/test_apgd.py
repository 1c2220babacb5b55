"""APGD: the reference's schedule and losses, invariants, determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.attacks._models import assert_in_ball_and_box, batch, mlp
from vitat_jax import attacks
from vitat_jax.attacks.apgd import checkpoint_schedule, single_run
from vitat_jax.errors import UserError


@functools.partial(jax.jit,
                   static_argnames=("eps", "norm", "loss", "n_iter",
                                    "n_restarts"))
def run_apgd(key, x, y, eps, norm="Linf", loss="ce", n_iter=10, n_restarts=1):
  if loss == "t":
    return attacks.apgd_targeted(mlp,
                                 key,
                                 x,
                                 y,
                                 eps=eps,
                                 norm=norm,
                                 n_iter=n_iter,
                                 n_target_classes=3)
  return attacks.apgd(mlp,
                      key,
                      x,
                      y,
                      eps=eps,
                      norm=norm,
                      loss=loss,
                      n_iter=n_iter,
                      n_restarts=n_restarts)


def test_checkpoints_follow_the_reference_schedule():
  # n_iter_2 = 22, size_decr = 3, n_iter_min = 6: windows 22, 19, 16, ...
  is_checkpoint, window = checkpoint_schedule(100)
  assert list(np.flatnonzero(is_checkpoint)) == [21, 40, 56, 69, 79, 86, 92, 98]
  assert list(window[is_checkpoint]) == [22, 19, 16, 13, 10, 7, 6, 6]
  # n = 10: k = 2, then max(k - 1, 1) = 1: every iteration after the first.
  assert list(np.flatnonzero(checkpoint_schedule(10)[0])) == list(range(1, 10))


def test_dlr_losses_match_the_reference_formulas():
  logits = jnp.array([[4.0, 1.0, 2.0, 3.0], [1.0, 5.0, 2.0, 0.0]])
  labels = jnp.array([0, 2])
  # (z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), negated.
  np.testing.assert_allclose(attacks.dlr_loss(logits, labels),
                             [-(4 - 3) / (4 - 2), -(2 - 5) / (5 - 1)],
                             rtol=1e-6)
  targets = jnp.array([3, 1])
  # (z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), negated.
  np.testing.assert_allclose(attacks.dlr_loss_targeted(logits, labels, targets),
                             [-(4 - 3) / (4 - 1.5), -(2 - 5) / (5 - 0.5)],
                             rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000),
       eps=st.sampled_from([2 / 255, 8 / 255]),
       loss=st.sampled_from(["ce", "dlr", "t"]),
       norm=st.sampled_from(["Linf", "L2"]))
def test_apgd_stays_in_the_ball_and_the_box(seed, eps, loss, norm):
  x, y = batch(seed)
  if norm == "L2":
    eps *= 10
  x_adv = run_apgd(jax.random.key(seed), x, y, eps, norm=norm, loss=loss)
  if norm == "Linf":
    assert_in_ball_and_box(x_adv, x, eps)
  else:
    norms = jnp.sqrt(jnp.sum(jnp.square(x_adv - x), axis=(1, 2, 3)))
    assert float(norms.max()) <= eps + 1e-5
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  # Every point it changed is misclassified; every other is the clean image.
  changed = np.asarray(jnp.any(x_adv != x, axis=(1, 2, 3)))
  wrong = np.asarray(jnp.argmax(mlp(x_adv), -1) != y)
  np.testing.assert_array_equal(changed, wrong)


def test_apgd_is_deterministic_per_key():
  x, y = batch(1, n=16)
  eps = 4 / 255
  a = run_apgd(jax.random.key(3), x, y, eps)
  b = run_apgd(jax.random.key(3), x, y, eps)
  np.testing.assert_array_equal(a, b)
  c = run_apgd(jax.random.key(4), x, y, eps)
  assert not np.array_equal(a, c)


def test_apgd_breaks_more_than_pgd_with_the_same_budget():
  x, y = batch(2, n=32, edges=False)
  eps = 3 / 255
  key = jax.random.key(0)
  pgd = attacks.pgd(mlp, key, x, y, eps=eps, alpha=eps / 4, steps=10)
  apgd = run_apgd(key, x, y, eps)
  pgd_acc = float((jnp.argmax(mlp(pgd), -1) == y).mean())
  apgd_acc = float((jnp.argmax(mlp(apgd), -1) == y).mean())
  assert 0 < apgd_acc <= pgd_acc < 1


def test_single_run_tracks_the_best_point_and_the_adversarial_one():
  x, y = batch(5, n=16, edges=False)
  eps = 3 / 255
  loss_fn = lambda logits: attacks.cross_entropy_per_example(logits, y)
  x_best, robust, loss_best, x_best_adv = jax.jit(lambda k: single_run(
      lambda xi, _: mlp(xi), loss_fn, k, x, y, eps=eps, norm="Linf", n_iter=20)
                                                 )(jax.random.key(1))
  np.testing.assert_allclose(loss_fn(mlp(x_best)), loss_best, rtol=1e-5)
  assert float(loss_best.min()) > 0
  broken = ~np.asarray(robust)
  assert broken.any() and not broken.all()
  assert np.all(np.asarray(jnp.argmax(mlp(x_best_adv), -1) != y)[broken])
  assert_in_ball_and_box(x_best, x, eps)


def test_more_restarts_break_at_least_as_much():
  x, y = batch(6, n=32, edges=False)
  eps = 2 / 255
  one = run_apgd(jax.random.key(2), x, y, eps, loss="dlr")
  three = run_apgd(jax.random.key(2), x, y, eps, loss="dlr", n_restarts=3)
  broken_one = np.asarray(jnp.argmax(mlp(one), -1) != y)
  broken_three = np.asarray(jnp.argmax(mlp(three), -1) != y)
  assert np.all(broken_three[broken_one])


def test_eot_averages_a_randomised_model():
  x, y = batch(7, n=8, edges=False)
  noisy = lambda xi, key: mlp(xi) + 0.1 * jax.random.normal(key, (10,))
  run = jax.jit(lambda k: attacks.apgd(
      noisy, k, x, y, eps=4 / 255, n_iter=5, eot_iter=4, stochastic=True))
  a, b = run(jax.random.key(0)), run(jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert_in_ball_and_box(a, x, 4 / 255)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(loss="xent"), "unknown APGD loss"),
    (dict(norm="L1"), "unknown APGD norm"),
    (dict(n_iter=0), "n_iter=0"),
    (dict(eps=-1.0), "eps=-1.0"),
])
def test_bad_arguments_are_one_line_errors(kwargs, fragment):
  x, y = batch(0, n=2)
  with pytest.raises(UserError, match=fragment) as info:
    attacks.apgd(mlp, jax.random.key(0), x, y, **kwargs)
  assert "\n" not in str(info.value)


def test_too_many_targets_is_a_one_line_error():
  x, y = batch(0, n=2)
  with pytest.raises(UserError, match="n_target_classes=10"):
    attacks.apgd_targeted(mlp, jax.random.key(0), x, y, n_target_classes=10)

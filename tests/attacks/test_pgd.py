"""PGD / CW: invariants, the reference's update rules, and determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from vitat_jax import attacks
from vitat_jax import masks
from vitat_jax import models

MODEL = models.create("deit_tiny_patch16_224",
                      num_classes=10,
                      img_size=8,
                      patch_size=4,
                      embed_dim=16,
                      depth=1,
                      num_heads=2)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]


def logits_fn(x):
  return MODEL.apply({"params": PARAMS}, x)


@functools.partial(jax.jit, static_argnames=("steps", "restarts", "loss"))
def run_pgd(key, x, y, eps, alpha, steps=5, restarts=1, loss="ce"):
  return attacks.pgd(logits_fn,
                     key,
                     x,
                     y,
                     eps=eps,
                     alpha=alpha,
                     steps=steps,
                     restarts=restarts,
                     loss=loss)


def _batch(seed, n=8):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.uniform(kx,
                            (n, 8, 8, 3)), jax.random.randint(ky, (n,), 0, 10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000),
       eps_255=st.floats(0.5, 16.0),
       alpha_fraction=st.floats(0.05, 1.0),
       loss=st.sampled_from(["ce", "cw"]))
def test_pgd_stays_in_the_eps_ball_and_the_box(seed, eps_255, alpha_fraction,
                                               loss):
  x, y = _batch(seed)
  # Some pixels at the box edges, where the box constraint binds.
  x = x.at[:, :2].set(0.0).at[:, -2:].set(1.0)
  eps = eps_255 / 255
  x_adv = run_pgd(jax.random.key(seed),
                  x,
                  y,
                  eps,
                  eps * alpha_fraction,
                  loss=loss)
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_is_deterministic_per_key():
  x, y = _batch(1)
  a = run_pgd(jax.random.key(5), x, y, 8 / 255, 2 / 255)
  b = run_pgd(jax.random.key(5), x, y, 8 / 255, 2 / 255)
  c = run_pgd(jax.random.key(6), x, y, 8 / 255, 2 / 255)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_pgd_increases_the_loss():
  x, _ = _batch(2, n=16)
  y = jnp.argmax(logits_fn(x), -1)  # all correct at the start
  x_adv = run_pgd(jax.random.key(0), x, y, 16 / 255, 4 / 255, steps=10)
  clean = attacks.cross_entropy_per_example(logits_fn(x), y)
  adv = attacks.cross_entropy_per_example(logits_fn(x_adv), y)
  assert float(adv.mean()) > float(clean.mean())
  assert float((adv >= clean).mean()) >= 0.9


def test_only_correctly_classified_examples_move():
  # A model that always predicts class 0: examples labelled 0 are correct and
  # keep moving; the others are wrong from the start and keep their start.
  weights = jax.random.normal(jax.random.key(9), (8 * 8 * 3, 10)) * 0.1

  def always_zero(x):
    return x.reshape(x.shape[0], -1) @ weights + jnp.eye(10)[0] * 5.0

  x, _ = _batch(3, n=6)
  y = jnp.array([0, 1, 0, 2, 3, 0])
  key = jax.random.key(7)
  eps, alpha = 8 / 255, 2 / 255
  x_adv = attacks.pgd(always_zero, key, x, y, eps=eps, alpha=alpha, steps=3)
  start = x + attacks.uniform_init(jax.random.fold_in(key, 0), x, eps)
  wrong = np.asarray(y != 0)
  np.testing.assert_allclose(x_adv[wrong], start[wrong], atol=1e-7)
  # The correct ones took 3 sign steps: they moved away from the start.
  assert not np.allclose(x_adv[~wrong], start[~wrong])


def test_restarts_keep_the_worst_case_per_example():
  x, y = _batch(4, n=16)
  one = run_pgd(jax.random.key(1), x, y, 8 / 255, 2 / 255, steps=2)
  three = run_pgd(jax.random.key(1),
                  x,
                  y,
                  8 / 255,
                  2 / 255,
                  steps=2,
                  restarts=3)
  loss_one = attacks.cross_entropy_per_example(logits_fn(one), y)
  loss_three = attacks.cross_entropy_per_example(logits_fn(three), y)
  # Restart 0 uses the same key in both runs, so three restarts can only
  # raise every example's loss.
  assert np.all(np.asarray(loss_three) >= np.asarray(loss_one) - 1e-5)


def test_cw_margin_matches_the_reference_formula():
  logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0], [30.0, 0.0, 1.0]])
  labels = jnp.array([0, 2, 1])
  # max_{j != y} z_j - z_y, floored at -10.
  expected = [max(2.0 - 3.0, -10), max(5.0 - (-1.0), -10), max(30.0 - 0.0, -10)]
  np.testing.assert_allclose(attacks.cw_margin_per_example(logits, labels),
                             expected)
  np.testing.assert_allclose(
      attacks.cw_margin_per_example(jnp.array([[40.0, 0.0]]), jnp.array([0])),
      [-10.0])


def _ce_objective(y):

  def objective(x_adv, key):
    del key
    return attacks.cross_entropy_per_example(logits_fn(x_adv), y).mean()

  return objective


def test_training_attack_with_prm_follows_the_reference_update():
  # One step: masked cells are zeroed, then every pixel (masked or not) takes
  # a sign step from the gradient at the masked perturbation.
  x, y = _batch(5)
  eps, alpha, r = 8 / 255, 2 / 255, 0.5
  key = jax.random.key(11)
  mask_fn = lambda k: masks.prm_mask(k, r, 2, 4)
  x_adv = attacks.perturb(_ce_objective(y),
                          key,
                          x,
                          eps=eps,
                          alpha=alpha,
                          steps=1,
                          delta_mask_fn=mask_fn)
  init_key, loop_key = jax.random.split(key)
  delta0 = attacks.uniform_init(init_key, x, eps)
  mask_key, _ = jax.random.split(jax.random.fold_in(loop_key, 0))
  masked = delta0 * mask_fn(mask_key)
  grad = jax.grad(lambda d: _ce_objective(y)(x + d, None))(masked)
  expected = attacks.project(x, masked + alpha * jnp.sign(grad), eps)
  np.testing.assert_allclose(x_adv - x, expected, atol=1e-6)
  # Where the mask was 0 and the gradient non-zero, the pixel sits at
  # exactly +-alpha (inside the box), not at its old value.
  zero_cells = np.broadcast_to(np.asarray(mask_fn(mask_key)) == 0, x.shape)
  inside = (x > 3 / 255) & (x < 1 - 3 / 255) & (grad != 0)
  sel = zero_cells & np.asarray(inside)
  assert sel.any()
  np.testing.assert_allclose(np.abs(np.asarray(x_adv - x)[sel]),
                             alpha,
                             atol=1e-6)


def test_training_attack_stays_in_bounds_and_is_keyed():
  x, y = _batch(6)
  run = jax.jit(lambda k: attacks.perturb(_ce_objective(y),
                                          k,
                                          x,
                                          eps=8 / 255,
                                          alpha=2 / 255,
                                          steps=4,
                                          delta_mask_fn=lambda mk: masks.
                                          prm_mask(mk, 0.3, 2, 4)))
  a, b = run(jax.random.key(1)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - x).max()) <= 8 / 255 + 1e-6
  assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_gaussian_start_is_small_and_in_the_box():
  x, y = _batch(7)
  x = x.at[:, 0].set(0.0)
  x_adv = attacks.perturb(_ce_objective(y),
                          jax.random.key(0),
                          x,
                          eps=8 / 255,
                          alpha=2 / 255,
                          steps=1,
                          init="gaussian")
  assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6
  assert float(x_adv.min()) >= 0.0

"""FAB / FAB-T: the projection, invariants, the linear case, determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.attacks._models import NUM_CLASSES, assert_in_ball_and_box, batch
from tests.attacks._models import mlp
from vitat_jax import attacks
from vitat_jax.attacks.fab import projection_linf


def _random_problem(seed, n=16, dim=12):
  rng = np.random.default_rng(seed)
  t = rng.uniform(0, 1, (n, dim)).astype(np.float32)
  w = rng.normal(size=(n, dim)).astype(np.float32)
  w[:, 0] = 0.0  # a coordinate the hyperplane ignores
  b = (np.sum(w * t, 1) + rng.normal(scale=0.3, size=n)).astype(np.float32)
  return t, w, b


def test_projection_reaches_the_hyperplane_inside_the_box():
  t, w, b = _random_problem(0)
  d = np.asarray(projection_linf(jnp.asarray(t), jnp.asarray(w),
                                 jnp.asarray(b)))
  x = t + d
  assert np.all(x >= -1e-6) and np.all(x <= 1 + 1e-6)
  np.testing.assert_allclose(np.sum(w * x, 1), b, atol=1e-4)
  np.testing.assert_array_equal(d[:, 0], 0.0)
  # Minimal: no smaller L-inf step reaches it (unconstrained lower bound).
  lower = np.abs(np.sum(w * t, 1) - b) / np.abs(w).sum(1)
  assert np.all(np.abs(d).max(1) >= lower - 1e-6)


@pytest.mark.parametrize("dim", [30, 192, 3072])
def test_projection_matches_the_reference(dim):
  # Every regime of the reference's sort-based projection: rows already on
  # the hyperplane, near it, far from it, out of the box's reach; points on
  # the box faces; coordinates with w = 0.
  torch = pytest.importorskip("torch")
  reference = pytest.importorskip("pyautoattack.fab_projections")
  rng = np.random.default_rng(dim)
  n = 64
  t = rng.uniform(0, 1, (n, dim)).astype(np.float32)
  t[:, :dim // 4] = rng.integers(0, 2, (n, dim // 4))
  w = rng.normal(size=(n, dim)).astype(np.float32)
  w[:, ::7] = 0.0
  offset = rng.normal(size=n) * np.abs(w).sum(1) * rng.choice(
      [0.0, 0.001, 0.05, 0.3, 2.0], n)
  b = (np.sum(w * t, 1) + offset).astype(np.float32)
  ours = np.asarray(
      projection_linf(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  theirs = reference.projection_linf(torch.from_numpy(t), torch.from_numpy(w),
                                     torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-6)


@functools.partial(jax.jit, static_argnames=("eps", "targeted"))
def run_fab(key, x, y, eps, targeted=True):
  if targeted:
    return attacks.fab_targeted(mlp,
                                key,
                                x,
                                y,
                                eps=eps,
                                n_iter=10,
                                n_target_classes=3)
  return attacks.fab(mlp, key, x, y, eps=eps, n_iter=10, n_restarts=2)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000),
       eps=st.sampled_from([2 / 255, 8 / 255]),
       targeted=st.booleans())
def test_fab_stays_in_the_ball_and_the_box(seed, eps, targeted):
  x, y = batch(seed)
  x_adv = run_fab(jax.random.key(seed), x, y, eps, targeted)
  assert_in_ball_and_box(x_adv, x, eps)
  changed = np.asarray(jnp.any(x_adv != x, axis=(1, 2, 3)))
  wrong = np.asarray(jnp.argmax(mlp(x_adv), -1) != y)
  np.testing.assert_array_equal(changed, wrong)


def test_fab_is_deterministic_and_breaks_points():
  x, y = batch(3, n=16, edges=False)
  a = run_fab(jax.random.key(0), x, y, 4 / 255)
  b = run_fab(jax.random.key(0), x, y, 4 / 255)
  np.testing.assert_array_equal(a, b)
  assert float((jnp.argmax(mlp(a), -1) != y).mean()) > 0.25


def test_fab_t_finds_the_minimal_perturbation_of_a_linear_model():
  # For a linear model the boundary to the runner-up class is a hyperplane:
  # the smallest L-inf perturbation reaching it is |f| / |w|_1 (the box
  # does not bind for images well inside [0, 1]). FAB-T steps onto it (times
  # eta = 1.05) and then closes in, so it breaks every point whose distance
  # is below eps / 1.05, and none whose distance exceeds eps.
  n = 32
  weights = jax.random.normal(jax.random.key(0), (8 * 8 * 3, NUM_CLASSES))
  linear = lambda x: x.reshape(x.shape[0], -1) @ weights
  x = 0.4 + 0.2 * jax.random.uniform(jax.random.key(1), (n, 8, 8, 3))
  logits = linear(x)
  y = jnp.argmax(logits, -1)
  runner_up = jnp.argsort(logits, -1)[:, -2]
  w_diff = weights[:, runner_up].T - weights[:, y].T
  gap = logits[jnp.arange(n), y] - logits[jnp.arange(n), runner_up]
  distance = np.asarray(gap / jnp.abs(w_diff).sum(-1))
  eps = float(np.median(distance))
  x_adv = attacks.fab_targeted(linear,
                               jax.random.key(0),
                               x,
                               y,
                               eps=eps,
                               n_iter=10,
                               n_target_classes=1)
  broken = np.asarray(jnp.argmax(linear(x_adv), -1) != y)
  assert np.all(broken[distance < eps / 1.05])
  assert not np.any(broken[distance > eps])
  assert (distance < eps / 1.05).sum() >= n // 4

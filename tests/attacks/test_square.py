"""Square attack: the reference's p schedule, invariants, determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from tests.attacks._models import assert_in_ball_and_box, batch, mlp
from vitat_jax import attacks
from vitat_jax.attacks.square import p_schedule, window_sizes


def _reference_p_selection(it, p_init=0.8):
  """fra31's SquareAttack.p_selection with resc_schedule=False."""
  for low, high, divisor in ((10, 50, 2), (50, 200, 4), (200, 500, 8),
                             (500, 1000, 16), (1000, 2000, 32),
                             (2000, 4000, 64), (4000, 6000, 128), (6000, 8000,
                                                                   256)):
    if low < it <= high:
      return p_init / divisor
  return p_init / 512 if it > 8000 else p_init


def test_p_schedule_is_the_references():
  p = p_schedule(10_000)
  for it in (0, 10, 11, 50, 51, 200, 201, 999, 1000, 1001, 4000, 6001, 8001,
             9999):
    assert p[it] == _reference_p_selection(it)
  # 8x8 images: round(sqrt(0.8 * 64)) = 7, then 5, 4, 3, 2, 1, ...
  sizes = window_sizes(5000, 0.8, 8, 8)
  assert sizes[0] == 7 and sizes[11] == 5 and sizes[4999] == 1
  assert window_sizes(10, 0.8, 32, 32)[0] == 29


@functools.partial(jax.jit, static_argnames=("eps", "n_queries"))
def run_square(key, x, y, eps, n_queries=100):
  return attacks.square(mlp, key, x, y, eps=eps, n_queries=n_queries)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([4 / 255, 16 / 255]))
def test_square_stays_in_the_ball_and_the_box(seed, eps):
  x, y = batch(seed)
  x_adv = run_square(jax.random.key(seed), x, y, eps)
  assert_in_ball_and_box(x_adv, x, eps)
  changed = np.asarray(jnp.any(x_adv != x, axis=(1, 2, 3)))
  wrong = np.asarray(jnp.argmax(mlp(x_adv), -1) != y)
  np.testing.assert_array_equal(changed, wrong)


def test_square_is_deterministic_per_key_and_breaks_points():
  x, y = batch(1, n=16, edges=False)
  a = run_square(jax.random.key(0), x, y, 8 / 255, n_queries=300)
  b = run_square(jax.random.key(0), x, y, 8 / 255, n_queries=300)
  np.testing.assert_array_equal(a, b)
  broken = float((jnp.argmax(mlp(a), -1) != y).mean())
  assert broken > 0.25
  c = run_square(jax.random.key(1), x, y, 8 / 255, n_queries=300)
  assert not np.array_equal(a, c)


def test_square_needs_only_outputs():
  # A model whose gradient is zero everywhere is no obstacle to Square.
  masked = lambda x: mlp(jax.lax.stop_gradient(x))
  x, y = batch(2, n=16, edges=False)
  x_adv = attacks.square(masked,
                         jax.random.key(0),
                         x,
                         y,
                         eps=8 / 255,
                         n_queries=300)
  assert float((jnp.argmax(mlp(x_adv), -1) != y).mean()) > 0.25

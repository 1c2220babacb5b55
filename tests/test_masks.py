"""Exact semantics of the warm-up r(t), ARD keep-masks and PRM patch masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vitat_jax import masks


def test_fractional_epoch_is_the_reference_t():
  # The reference: t = epoch - 1 + (i + 1) / S for 1-based epoch, 0-based i.
  steps_per_epoch = 7
  for epoch in (1, 2, 5):
    for i in range(steps_per_epoch):
      step = (epoch - 1) * steps_per_epoch + i
      expected = epoch - 1 + (i + 1) / steps_per_epoch
      assert float(masks.fractional_epoch(step, steps_per_epoch)) == \
          pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("t, n_w, final_keep_rate, expected", [
    (0.0, 10, 1.0, 0.0),
    (2.5, 10, 1.0, 0.25),
    (10.0, 10, 1.0, 1.0),
    (25.0, 10, 1.0, 1.0),
    (5.0, 10, 0.8, 0.4),
    (12.0, 10, 0.8, 0.8),
    (3.0, 0, 0.9, 0.9),
])
def test_warmup_value(t, n_w, final_keep_rate, expected):
  assert float(masks.warmup_value(t, n_w,
                                  final_keep_rate)) == pytest.approx(expected)


def test_ard_keep_extremes_and_rate():
  key = jax.random.key(0)
  assert not np.any(masks.ard_keep(key, 0.0, 12))
  assert np.all(masks.ard_keep(key, 1.0, 12) == 1.0)
  draws = jax.vmap(lambda k: masks.ard_keep(k, 0.3, 12))(jax.random.split(
      key, 2000))
  assert draws.shape == (2000, 12)
  assert set(np.unique(draws)) <= {0.0, 1.0}
  assert float(draws.mean()) == pytest.approx(0.3, abs=0.02)
  # Blocks are independent: not all equal within a draw.
  assert np.any(draws.min(axis=1) != draws.max(axis=1))


def _python_count(num_patches, r):
  # The reference computes int(N * (1 - r)) in float64.
  return int(num_patches * (1 - r))


@settings(max_examples=60, deadline=None)
@given(grid=st.sampled_from([2, 4, 8, 14]),
       r=st.floats(0.0, 1.0, allow_nan=False),
       seed=st.integers(0, 2**31 - 1))
def test_prm_masks_exactly_floor_n_times_one_minus_r_patches(grid, r, seed):
  patch = 3
  mask = np.asarray(masks.prm_mask(jax.random.key(seed), r, grid, patch))
  assert mask.shape == (1, grid * patch, grid * patch, 1)
  cells = mask[0, :, :, 0].reshape(grid, patch, grid, patch)
  # Constant within every patch: the grid is the model's patch grid.
  assert np.all(cells.min(axis=(1, 3)) == cells.max(axis=(1, 3)))
  masked = int((cells[:, 0, :, 0] == 0).sum())
  n = grid * grid
  exact = n * (1 - r)
  if abs(exact - round(exact)) > 1e-3:  # away from float-rounding ties
    assert masked == math.floor(exact) == _python_count(n, r)
  else:
    assert masked in (math.floor(exact), round(exact))


def test_prm_counts_match_the_reference_on_its_schedule():
  # Every r(t) the reference visits on CIFAR-10 (8x8 grid, n_w = 10,
  # 782 steps per epoch), in its float64 arithmetic.
  steps_per_epoch, n_w, n = 782, 10, 64
  steps = np.arange(0, n_w * steps_per_epoch + 5, 37)
  t = masks.fractional_epoch(steps, steps_per_epoch)
  ours = np.asarray(masks.prm_num_masked(masks.warmup_value(t, n_w), n))
  for step, count in zip(steps, ours):
    t64 = (step + 1) / steps_per_epoch
    r64 = min(t64 / n_w, 1.0)
    assert count == _python_count(n, r64), step


def test_prm_choice_is_uniform_and_keyed():
  key = jax.random.key(3)
  a = masks.prm_grid_mask(key, 0.5, 4)
  np.testing.assert_array_equal(a, masks.prm_grid_mask(key, 0.5, 4))
  counts = jax.vmap(lambda k: 1 - masks.prm_grid_mask(k, 0.75, 4))(
      jax.random.split(key, 4000)).mean(axis=0)
  # floor(16 * 0.25) = 4 of 16 cells masked: each cell with probability 1/4.
  np.testing.assert_allclose(counts, 0.25, atol=0.03)


def test_masks_run_inside_jit_with_traced_r():
  fn = jax.jit(lambda k, r:
               (masks.prm_mask(k, r, 8, 4), masks.ard_keep(k, r, 12)))
  mask, keep = fn(jax.random.key(0), jnp.float32(0.5))
  assert int((mask[0, ::4, ::4, 0] == 0).sum()) == 32
  assert keep.shape == (12,)

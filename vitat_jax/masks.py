"""ARD keep-masks, PRM patch masks and their shared warm-up schedule.

Both tricks act only while the training attack is generated, and both are
driven by one value r(t) in [0, final_keep_rate]:

  r(t) = min(t / n_w, 1) * final_keep_rate,   t = fractional epoch.

- ARD: every block's attention-branch gradient is kept with probability r
  (gamma ~ Bernoulli(r)), independently per block and attack iteration. At
  t = 0 every attention gradient is dropped; after n_w epochs none is.
- PRM: floor(N * (1 - r)) of the N patch-grid cells, chosen uniformly without
  replacement (one choice for the whole batch), have the perturbation zeroed.

Everything here is a pure function of a PRNG key and traced values, so the
masks can be drawn inside the jitted attack loop.
"""

import jax
import jax.numpy as jnp

# floor() of a float32 product can land just under an integer that float64
# arithmetic (the reference's) hits exactly; this slack keeps the counts equal.
_FLOOR_SLACK = 1e-4


def fractional_epoch(step, steps_per_epoch: int):
  """The reference's t for 0-based global `step`: epoch - 1 + (i + 1) / S."""
  return (jnp.asarray(step, jnp.float32) + 1.0) / steps_per_epoch


def warmup_value(t, warmup_epochs: float, final_keep_rate: float = 1.0):
  """r(t) = min(t / n_w, 1) * final_keep_rate; n_w = 0: no warm-up."""
  t = jnp.asarray(t, jnp.float32)
  if warmup_epochs <= 0:
    return jnp.full_like(t, final_keep_rate)
  return jnp.minimum(t / warmup_epochs, 1.0) * final_keep_rate


def eps_scale(step,
              steps_per_epoch: int,
              warmup_epochs: float,
              floor: float = 0.0):
  """The epsilon warm-up: eps(step) / attack.eps, linear from `floor` at
  step 0 to 1 after `warmup_epochs` (the Light recipe's ramp); 1.0 (a
  Python number, so the attack is unchanged) without a warm-up."""
  if warmup_epochs <= 0:
    return 1.0
  t = jnp.asarray(step, jnp.float32) / (warmup_epochs * steps_per_epoch)
  return floor + (1.0 - floor) * jnp.minimum(t, 1.0)


def ard_keep(key, r, num_blocks: int):
  """One Bernoulli(r) keep value per attention block, as float32 [num_blocks]."""
  return jax.random.bernoulli(key, r, (num_blocks,)).astype(jnp.float32)


def prm_num_masked(r, num_patches: int):
  """floor(N * (1 - r)): how many grid cells lose their perturbation."""
  masked = jnp.floor(num_patches * (1.0 - jnp.asarray(r, jnp.float32)) +
                     _FLOOR_SLACK)
  return jnp.clip(masked, 0, num_patches).astype(jnp.int32)


def prm_grid_mask(key, r, grid_size: int):
  """float32 [grid, grid]: 0 on floor(N (1 - r)) random cells, 1 elsewhere."""
  num_patches = grid_size * grid_size
  # A cell is masked when its rank in a random permutation is below the
  # count; this keeps shapes static while the count is a traced value.
  rank = jax.random.permutation(key, num_patches)
  keep = rank >= prm_num_masked(r, num_patches)
  return keep.astype(jnp.float32).reshape(grid_size, grid_size)


def prm_mask(key, r, grid_size: int, patch_size: int):
  """float32 [1, H, W, 1] pixel mask for an NHWC perturbation."""
  grid = prm_grid_mask(key, r, grid_size)
  pixels = jnp.repeat(jnp.repeat(grid, patch_size, axis=0), patch_size, axis=1)
  return pixels[None, :, :, None]

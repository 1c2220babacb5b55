"""On-device augmentation: pure, jittable functions of a PRNG key.

The reference trains CIFAR-10 with torchvision's RandomCrop(32, padding=4)
and RandomHorizontalFlip(); `random_crop_flip` is the batched equivalent,
run inside the jitted train step so the host only ships uint8 images.
"""

import jax
import jax.numpy as jnp

from vitat_jax.errors import UserError


def to_float(images_uint8) -> jax.Array:
  """uint8 images as float32 in [0, 1]."""
  return jnp.asarray(images_uint8, jnp.float32) / 255.0


def crop_flip_params(key,
                     batch_size: int,
                     padding: int = 4,
                     flip: bool = True) -> tuple[jax.Array, jax.Array]:
  """Per-example crop offsets [B, 2] (row, column) in [0, 2 * padding] and
  horizontal-flip decisions [B] (all False when `flip` is False)."""
  if padding < 0:
    raise UserError(f"the crop padding must be >= 0, got {padding}")
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  else:
    flips = jnp.zeros((batch_size,), bool)
  return offsets, flips


def apply_crop_flip(images, offsets, flips, padding: int = 4) -> jax.Array:
  """Crops each zero-padded image at its offset, then flips where asked.

  Args:
    images: [B, H, W, C].
    offsets: int [B, 2], the top-left corner of each crop in the padded image.
    flips: bool [B], whether to mirror each crop left-right.
    padding: zero pixels added on every side before cropping.

  Returns:
    [B, H, W, C] of the input's dtype.
  """
  _, height, width, channels = images.shape
  padded = jnp.pad(images,
                   ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  crops = jax.vmap(crop)(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1, :], crops)


def random_crop_flip(key,
                     images,
                     padding: int = 4,
                     flip: bool = True) -> jax.Array:
  """RandomCrop(H, padding) then RandomHorizontalFlip(0.5), per example.

  Args:
    key: a PRNG key; the same key gives the same output.
    images: float [B, H, W, C].
    padding: zero pixels added on every side before the H x W crop.
    flip: whether to mirror half of the examples (at random) left-right.

  Returns:
    The augmented images, same shape and dtype.
  """
  offsets, flips = crop_flip_params(key, images.shape[0], padding, flip)
  return apply_crop_flip(images, offsets, flips, padding)

"""On-device crop and flip: shapes, keys, and agreement with NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax import data
from vitat_jax.errors import UserError

augment = jax.jit(data.random_crop_flip, static_argnames=("padding", "flip"))


def _images(seed=0, shape=(16, 8, 8, 3)):
  # Values in [0.2, 0.8], so the zero padding is told apart from content.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.2, 0.8, shape), jnp.float32)


def _numpy_crop_flip(images, offsets, flips, padding):
  """torchvision's RandomCrop(padding) + RandomHorizontalFlip, example-wise."""
  images = np.asarray(images)
  _, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  out = []
  for image, (row, col), flip in zip(padded, np.asarray(offsets),
                                     np.asarray(flips)):
    crop = image[row:row + height, col:col + width]
    out.append(crop[:, ::-1] if flip else crop)
  return np.stack(out)


def test_shape_dtype_and_determinism():
  images = _images()
  first = augment(jax.random.key(0), images)
  assert first.shape == images.shape and first.dtype == images.dtype
  np.testing.assert_array_equal(first, augment(jax.random.key(0), images))
  assert not np.array_equal(first, augment(jax.random.key(1), images))


def test_no_padding_and_no_flip_is_the_identity():
  images = _images()
  np.testing.assert_array_equal(
      augment(jax.random.key(3), images, padding=0, flip=False), images)


def test_matches_a_numpy_crop_and_flip_with_the_same_draws():
  images = _images(shape=(32, 8, 8, 3))
  key = jax.random.key(4)
  offsets, flips = data.crop_flip_params(key, 32, padding=3)
  expected = _numpy_crop_flip(images, offsets, flips, padding=3)
  np.testing.assert_array_equal(augment(key, images, padding=3), expected)
  assert np.asarray(offsets).min() >= 0 and np.asarray(offsets).max() <= 6


def test_draws_cover_every_offset_and_flip_about_half():
  offsets, flips = data.crop_flip_params(jax.random.key(5), 2000, padding=4)
  assert set(np.unique(np.asarray(offsets))) == set(range(9))
  assert 0.45 < float(jnp.mean(flips)) < 0.55
  _, no_flips = data.crop_flip_params(jax.random.key(5), 100, flip=False)
  assert not np.asarray(no_flips).any()


def test_output_is_input_pixels_or_zero_padding():
  images = _images(seed=6)
  out = np.asarray(augment(jax.random.key(6), images))
  content = out[out != 0]
  assert content.min() >= 0.2 and content.max() <= 0.8
  # A crop shifted by (dy, dx) keeps (8 - |dy|) x (8 - |dx|) input pixels.
  offsets, _ = data.crop_flip_params(jax.random.key(6), len(images), padding=4)
  shifts = np.abs(np.asarray(offsets) - 4)
  np.testing.assert_array_equal((out != 0).all(-1).sum((1, 2)),
                                (8 - shifts[:, 0]) * (8 - shifts[:, 1]))
  input_values = set(np.asarray(images).ravel())
  assert set(content.ravel()) <= input_values


def test_flip_only_mirrors_some_examples():
  images = _images(shape=(64, 4, 4, 1))
  out = np.asarray(augment(jax.random.key(7), images, padding=0))
  mirrored = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  unchanged = np.all(out == np.asarray(images), axis=(1, 2, 3))
  assert (mirrored | unchanged).all()
  assert 10 < mirrored.sum() < 54


def test_works_on_uint8_and_rejects_negative_padding():
  images = jnp.asarray(
      np.random.default_rng(8).integers(1, 256, (4, 6, 6, 3)), jnp.uint8)
  out = data.random_crop_flip(jax.random.key(8), images, padding=2)
  assert out.dtype == jnp.uint8 and out.shape == images.shape
  with pytest.raises(UserError):
    data.random_crop_flip(jax.random.key(8), images, padding=-1)


def test_to_float_scales_uint8_to_unit_range():
  images = np.array([[0, 51, 255]], np.uint8)
  out = data.to_float(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=1e-6)


def test_compiles_once_per_shape():
  trace_count = 0

  @functools.partial(jax.jit, static_argnames=("padding",))
  def counted(key, images, padding):
    nonlocal trace_count
    trace_count += 1
    return data.random_crop_flip(key, images, padding=padding)

  for seed in range(3):
    counted(jax.random.key(seed), _images(seed), padding=4)
  assert trace_count == 1

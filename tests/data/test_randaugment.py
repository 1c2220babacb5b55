"""On-device RandAugment: shapes, range, keys, identities, spec errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax.data import randaugment
from vitat_jax.errors import UserError

IMAGES = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
KEY = jax.random.key(3)
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def test_batch_keeps_shape_range_and_is_keyed():
  run = jax.jit(lambda k, x: randaugment.randaugment(k, x, "rand-m9-n2"))
  a, b = run(KEY, IMAGES), run(KEY, IMAGES)
  np.testing.assert_array_equal(a, b)
  assert a.shape == IMAGES.shape and a.dtype == IMAGES.dtype
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  c = run(jax.random.key(4), IMAGES)
  assert not np.array_equal(a, c)
  # Some examples change, and they change independently of each other.
  changed = np.abs(np.asarray(a - IMAGES)).reshape(4, -1).max(axis=1) > 0
  assert changed.any()


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_at_magnitude_zero_are_the_identity(name):
  out = randaugment.OPS[name](IMAGES[0], jnp.float32(0.0), KEY)
  np.testing.assert_allclose(out, IMAGES[0], atol=1e-6)


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_every_op_stays_in_range_and_jits(name):
  op = jax.jit(lambda x, level: randaugment.OPS[name](x, level, KEY))
  out = op(IMAGES[1], jnp.float32(9.0))
  assert out.shape == IMAGES[1].shape
  assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6


def test_colour_ops_at_their_neutral_levels():
  x = IMAGES[2]
  # Enhancement factor 0.1 + 1.8 m / 10 is 1 (no change) at m = 5.
  for name in ("color", "contrast", "brightness", "sharpness"):
    np.testing.assert_allclose(randaugment.OPS[name](x, 5.0, KEY),
                               x,
                               atol=1e-6,
                               err_msg=name)
  # Solarize at m = 0 inverts only pixels >= 1; posterize at m = 10 keeps
  # 4 bits.
  np.testing.assert_allclose(randaugment.solarize(x * 0.99, 0.0, KEY), x * 0.99)
  post = np.asarray(randaugment.posterize(x, 10.0, KEY)) * 255
  np.testing.assert_allclose(post % 16, 0, atol=1e-3)


def test_translate_moves_pixels_by_the_stated_fraction():
  x = jnp.zeros((20, 20, 3)).at[:, 10].set(1.0)
  out = randaugment.translate_x(x, 10.0 / 0.45 * 0.1, jax.random.key(0))
  # 0.1 of 20 pixels = 2 columns, one way or the other.
  column = int(np.argmax(np.asarray(out)[5, :, 0]))
  assert column in (8, 12)


def test_equalize_flattens_the_histogram():
  x = jnp.linspace(0.3, 0.5, 16 * 16 * 3).reshape(16, 16, 3)
  out = np.asarray(randaugment.equalize(x, 0.0, KEY))
  assert out.min() < 0.05 and out.max() > 0.9


@pytest.mark.parametrize(
    "spec", ["rand-m9-n2", "rand-m9-mstd0.5", "rand-m9-n2-mstd0.5"])
def test_valid_specs(spec):
  randaugment.parse_spec(spec)


@pytest.mark.parametrize(
    "spec", ["rand-q9", "auto-m9", "rand-m11", "rand-mx", "rand-n0"])
def test_bad_specs_are_one_line_user_errors(spec):
  with pytest.raises(UserError, match="RandAugment spec"):
    randaugment.parse_spec(spec)

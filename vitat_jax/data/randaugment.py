"""RandAugment on device: timm's `rand-m9-mstd0.5` ops on float images.

The paper found RandAugment hurts adversarial training of ViTs; this module
lets that finding be rerun inside the jitted train step. Per example, N ops
are drawn uniformly with replacement from `OPS`, each applied with
probability 0.5 at magnitude m (out of 10; with `mstd` > 0, m ~ N(m, mstd)
clipped to [0, 10] per application), as timm's `RandAugment`. Magnitudes map
to arguments as in timm's default (non-"inc") table:

  rotate        +-30 m/10 degrees        shear_x/y    +-0.3 m/10
  translate_x/y +-0.45 m/10 of the size  solarize     threshold 1 - m/10
  posterize     keep int(4 m/10) bits    color, contrast, brightness,
  sharpness     blend factor 0.1 + 1.8 m/10 (1 = unchanged)

Images are float [B, H, W, 3] in [0, 1]; geometric ops sample bilinearly
and fill with the ImageNet mean pixel, as timm's hparams do. Equalize is a
per-channel 256-bin histogram equalisation (PIL's, up to rounding).

Specs: "rand-m9-n2", "rand-m9-mstd0.5", "rand-m9-n2-mstd0.5" (n defaults to
2, mstd to 0).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError

_FILL = (0.485, 0.456, 0.406)
# A NumPy constant: a module-level jnp array would compile at import time.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class Spec:
  magnitude: float = 9.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  prob: float = 0.5


def parse_spec(spec: str) -> Spec:
  """'rand-m9-n2-mstd0.5' -> Spec; a one-line UserError for anything else."""
  parts = spec.split("-")
  hint = ("use e.g. 'rand-m9-n2' or 'rand-m9-mstd0.5' (sections m<magnitude "
          "0..10>, n<ops per image>, mstd<magnitude std>)")
  if parts[0] != "rand":
    raise UserError(f"unknown RandAugment spec {spec!r}: {hint}")
  values = {}
  try:
    for part in parts[1:]:
      if part.startswith("mstd"):
        values["magnitude_std"] = float(part[4:])
      elif part.startswith("m"):
        values["magnitude"] = float(part[1:])
      elif part.startswith("n"):
        values["num_layers"] = int(part[1:])
      else:
        raise ValueError(part)
  except ValueError:
    raise UserError(f"unknown RandAugment spec {spec!r}: {hint}") from None
  result = Spec(**values)
  if not (0 <= result.magnitude <= 10 and result.num_layers >= 1 and
          result.magnitude_std >= 0):
    raise UserError(f"RandAugment spec {spec!r}: the magnitude must be in "
                    "[0, 10], n >= 1 and mstd >= 0")
  return result


# --- colour ops: image [H, W, 3] in [0, 1], level in [0, 10] -> image ----


def _grayscale(img):
  return jnp.sum(img * _LUMA, axis=-1, keepdims=True)


def _blend(degenerate, img, factor):
  return jnp.clip(degenerate + factor * (img - degenerate), 0.0, 1.0)


def _enhance_factor(level):
  return level / 10.0 * 1.8 + 0.1


def identity(img, level, key):
  del level, key
  return img


def autocontrast(img, level, key):
  del level, key
  lo = img.min(axis=(0, 1), keepdims=True)
  hi = img.max(axis=(0, 1), keepdims=True)
  scale = jnp.where(hi > lo, 1.0 / jnp.maximum(hi - lo, 1e-12), 1.0)
  offset = jnp.where(hi > lo, lo, 0.0)
  return jnp.clip((img - offset) * scale, 0.0, 1.0)


def equalize(img, level, key):
  """Per-channel histogram equalisation over 256 levels (PIL's rule)."""
  del level, key
  levels = jnp.clip(jnp.round(img * 255.0), 0, 255).astype(jnp.int32)

  def channel(values):
    hist = jnp.bincount(values.reshape(-1), length=256)
    last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))]
    step = (values.size - last) // 255
    lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
    out = jnp.clip(lut, 0, 255)[values].astype(jnp.float32) / 255.0
    return jnp.where(step > 0, out, values.astype(jnp.float32) / 255.0)

  return jnp.stack([channel(levels[..., c]) for c in range(3)], axis=-1)


def solarize(img, level, key):
  del key
  threshold = 1.0 - level / 10.0
  return jnp.where(img >= threshold, 1.0 - img, img)


def posterize(img, level, key):
  del key
  bits = jnp.floor(level / 10.0 * 4.0).astype(jnp.int32)
  levels = jnp.clip(jnp.round(img * 255.0), 0, 255).astype(jnp.int32)
  mask = jnp.left_shift(jnp.int32(255), 8 - bits) & 255
  return (levels & mask).astype(jnp.float32) / 255.0


def color(img, level, key):
  del key
  return _blend(_grayscale(img), img, _enhance_factor(level))


def contrast(img, level, key):
  del key
  return _blend(jnp.mean(_grayscale(img)), img, _enhance_factor(level))


def brightness(img, level, key):
  del key
  return _blend(jnp.zeros_like(img), img, _enhance_factor(level))


def sharpness(img, level, key):
  """PIL's SHARPEN smoothing kernel as the degenerate; borders unchanged."""
  del key
  kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
  padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = img.shape[:2]
  smooth = sum(kernel[i, j] * padded[i:i + h, j:j + w]
               for i in range(3)
               for j in range(3))
  interior = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(interior, smooth, img), img, _enhance_factor(level))


# --- geometric ops: an inverse affine map, bilinear sampling -------------


def _affine(img, matrix):
  """out[y, x] = img at (x', y') = matrix @ (x, y, 1), PIL's AFFINE rule."""
  h, w = img.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  src_x = matrix[0] * xs + matrix[1] * ys + matrix[2]
  src_y = matrix[3] * xs + matrix[4] * ys + matrix[5]
  channels = [
      jax.scipy.ndimage.map_coordinates(img[..., c], [src_y, src_x],
                                        order=1,
                                        mode="constant",
                                        cval=_FILL[c]) for c in range(3)
  ]
  return jnp.stack(channels, axis=-1)


def _signed(value, key):
  return jnp.where(jax.random.bernoulli(key), -value, value)


def rotate(img, level, key):
  h, w = img.shape[:2]
  angle = jnp.deg2rad(_signed(level / 10.0 * 30.0, key))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
  return _affine(
      img,
      (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def shear_x(img, level, key):
  return _affine(img,
                 (1.0, _signed(level / 10.0 * 0.3, key), 0.0, 0.0, 1.0, 0.0))


def shear_y(img, level, key):
  return _affine(img,
                 (1.0, 0.0, 0.0, _signed(level / 10.0 * 0.3, key), 1.0, 0.0))


def translate_x(img, level, key):
  pixels = _signed(level / 10.0 * 0.45, key) * img.shape[1]
  return _affine(img, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(img, level, key):
  pixels = _signed(level / 10.0 * 0.45, key) * img.shape[0]
  return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


OPS = {
    "identity": identity,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
    "solarize": solarize,
    "color": color,
    "posterize": posterize,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
_BRANCHES = tuple(OPS.values())


def _augment_one(key, img, spec: Spec):
  for layer in range(spec.num_layers):
    op_key, apply_key, level_key, sign_key = jax.random.split(
        jax.random.fold_in(key, layer), 4)
    index = jax.random.randint(op_key, (), 0, len(_BRANCHES))
    level = jnp.float32(spec.magnitude)
    if spec.magnitude_std > 0:
      level = jnp.clip(
          level + spec.magnitude_std * jax.random.normal(level_key), 0.0, 10.0)
    out = jax.lax.switch(index, _BRANCHES, img, level, sign_key)
    img = jnp.where(jax.random.bernoulli(apply_key, spec.prob), out, img)
  return img


def randaugment(key, images: jax.Array, spec) -> jax.Array:
  """RandAugment per example of float images [B, H, W, 3] in [0, 1].

  `spec` is a string ("rand-m9-n2") or a `Spec`.
  """
  if isinstance(spec, str):
    spec = parse_spec(spec)
  keys = jax.random.split(key, images.shape[0])
  out = jax.vmap(lambda k, x: _augment_one(k, x, spec))(keys, images)
  return out.astype(images.dtype)


def check_spec(spec: str) -> None:
  """Raises UserError unless `spec` is empty or a valid RandAugment spec."""
  if spec:
    parse_spec(spec)

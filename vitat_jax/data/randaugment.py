"""RandAugment on device: timm's `rand_augment_transform`, op for op.

The paper found RandAugment hurts adversarial training of ViTs; this module
lets that finding be rerun inside the jitted train step. It follows timm's
`rand_augment_transform(spec, hparams)` as timm's `create_transform` calls
it (timm 1.0): per example, N ops drawn uniformly with replacement from
timm's default list (`TRANSFORMS`, or `INCREASING_TRANSFORMS` with `inc1`),
each applied with probability p at magnitude m; with `mstd` > 0 the
magnitude is drawn per application from N(m, mstd) (uniform in [0, m] when
mstd > 100) and clipped to [0, mmax or 10]. Each op maps the magnitude to its
argument as timm's `LEVEL_TO_ARG` does (e.g. Solarize threshold
int(256 m / 10), the non-increasing one) and then does what Pillow does to a
uint8 RGB image, in Pillow's arithmetic: integer look-up tables, float32
blends that truncate, the SMOOTH filter for Sharpness with the border kept,
and affine warps that sample like Pillow's `transform` (pixel centres,
edge-clamped neighbours, the fill colour outside) with bilinear or bicubic
resampling picked at random per op, as timm's default 'random'
interpolation. Signs of Rotate/Shear/Translate are random, as timm's.

Images are float [B, H, W, 3] in [0, 1] holding uint8 values (k / 255): the
ops work on the 0..255 levels and return k / 255 again. The fill colour is
timm's `img_mean`: round(255 * mean) of the mean the model normalises with
(`fill_color`). Only the random draws differ from timm (JAX keys instead of
Python's `random`); given the same op, magnitude, sign and resampling, the
result is Pillow's up to float rounding (tests/data/test_randaugment.py
compares every op with timm's `AugmentOp`).

Specs (timm's grammar): "rand" then dash-separated sections m<int magnitude,
default 10>, n<ops per image, default 2>, mstd<float>, mmax<int>, inc<0|1>,
p<float probability, default 0.5>; e.g. "rand-m9-mstd0.5", "rand-m9-n2".
"""

import dataclasses
import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError

_LEVEL_DENOM = 10.0
_IMAGENET_MEAN = (0.485, 0.456, 0.406)

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize",
              "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness",
              "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                         "PosterizeIncreasing", "SolarizeIncreasing",
                         "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                         "BrightnessIncreasing", "SharpnessIncreasing",
                         "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class Spec:
  magnitude: int = 10
  num_layers: int = 2
  magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
  magnitude_max: Optional[int] = None  # None: 10
  increasing: bool = False
  prob: float = 0.5

  @property
  def transforms(self) -> tuple[str, ...]:
    return INCREASING_TRANSFORMS if self.increasing else TRANSFORMS


_HINT = ("use timm's grammar, e.g. 'rand-m9-mstd0.5' or 'rand-m9-n2' "
         "(sections m<magnitude>, n<ops per image>, mstd<std>, mmax<max>, "
         "inc<0|1>, p<prob>)")


def parse_spec(spec: str) -> Spec:
  """'rand-m9-n2-mstd0.5' -> Spec, read as timm's rand_augment_transform
  reads it; a one-line UserError for anything timm would not accept (and
  for timm's named transform sets, 't...', which are not offered here)."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise UserError(f"unknown RandAugment spec {spec!r}: {_HINT}")
  values = {}
  for part in parts[1:]:
    pieces = re.split(r"(\d.*)", part)
    if part.startswith("t") or len(pieces) < 2:
      raise UserError(f"unknown RandAugment spec {spec!r}: {_HINT}")
    name, text = pieces[:2]
    try:
      if name == "mstd":
        std = float(text)
        # timm: the first mstd / mmax wins (hparams.setdefault).
        values.setdefault("magnitude_std", math.inf if std > 100 else std)
      elif name == "mmax":
        values.setdefault("magnitude_max", int(text))
      elif name == "inc":
        values["increasing"] = bool(int(text))
      elif name == "m":
        values["magnitude"] = int(text)
      elif name == "n":
        values["num_layers"] = int(text)
      elif name == "p":
        values["prob"] = float(text)
      else:
        raise ValueError(name)
    except ValueError:
      raise UserError(f"unknown RandAugment spec {spec!r}: {_HINT}") from None
  result = Spec(**values)
  if result.num_layers < 1 or not 0 <= result.prob <= 1:
    raise UserError(f"RandAugment spec {spec!r}: n must be >= 1 and p in "
                    "[0, 1]")
  return result


def check_spec(spec: str) -> None:
  """Raises UserError unless `spec` is empty or a valid RandAugment spec."""
  if spec:
    parse_spec(spec)


def fill_color(mean=_IMAGENET_MEAN) -> tuple[int, int, int]:
  """timm's `img_mean` hparam: min(255, round(255 * mean)) per channel."""
  return tuple(min(255, round(255 * float(m))) for m in mean)


# --- magnitude -> op argument, as timm's LEVEL_TO_ARG --------------------
# `m` is the clipped magnitude (float32), `negate` a bool scalar (timm's
# _randomly_negate).

# timm computes m / 10 * c in float64 and Pillow takes the result as a
# float32 (blend factors) or double (coordinates); the forms (m * 10 c) / 100
# below round once in float32, so an integer m gives the float32 nearest to
# timm's value (a factor of exactly 1 stays 1, a shift of 4.5 px stays 4.5).


def _divide(numerator, denominator: float):
  """numerator / denominator, correctly rounded: XLA turns a division by a
  constant (or a broadcast scalar) into a product with its rounded
  reciprocal; a divisor of the numerator's shape behind a barrier stays a
  division."""
  divisor = jax.lax.optimization_barrier(numerator * 0.0 + denominator)
  return numerator / divisor


def _scaled(m, numerator, denominator):
  """m / 10 * (numerator / denominator) with one float32 rounding."""
  return _divide(m * numerator, denominator * _LEVEL_DENOM)


def _signed(value, negate):
  return jnp.where(negate, -value, value)


def _enhance_arg(m, negate):
  del negate
  return _divide(m * 18.0 + 10.0, 100.0)  # m / 10 * 1.8 + 0.1


def _enhance_increasing_arg(m, negate):
  # max(0.1, 1 +- m / 10 * 0.9)
  return jnp.maximum(jnp.float32(0.1),
                     _divide(100.0 + _signed(m * 9.0, negate), 100.0))


def _posterize_arg(m):
  return jnp.floor(_scaled(m, 4.0, 1.0)).astype(jnp.int32)


def _solarize_arg(m):
  return jnp.minimum(256, jnp.floor(_scaled(m, 256.0, 1.0)).astype(jnp.int32))


# --- Pillow's uint8 arithmetic on levels [H, W, 3] (float32, 0..255) -----


def _lut(img, table):
  """Pillow's `point`: a [3, 256] table, clipped to uint8 as Pillow does."""
  table = jnp.clip(table, 0, 255).astype(jnp.float32)
  index = img.astype(jnp.int32)
  return jnp.stack([table[c][index[..., c]] for c in range(3)], axis=-1)


def _to_uint8(value):
  """C's (UINT8) cast of a float after Pillow's clipping: truncation."""
  return jnp.clip(jnp.floor(value), 0.0, 255.0)


def _rounded(product):
  """`product` rounded to float32 on its own, as Pillow's C (no FMA) rounds
  it: LLVM fuses a multiply and the add after it into one fused
  multiply-add (one rounding), but not across a select. (Products are
  never NaN here.)"""
  return jax.tree.map(lambda p: jnp.where(jnp.isnan(p), 0.0, p), product)


def _blend(degenerate, img, factor):
  """Image.blend(degenerate, img, factor): float32 in1 + a (in2 - in1)."""
  factor = jnp.asarray(factor, jnp.float32)
  return _to_uint8(degenerate + _rounded(factor * (img - degenerate)))


def _luma(img):
  """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
  rgb = img.astype(jnp.int32)
  value = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
  return jnp.right_shift(value + 0x8000, 16)[..., None].astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _auto_contrast_misses() -> np.ndarray:
  """Sorted keys lo * 65536 + hi * 256 + ix where Pillow's float64 table
  entry int(ix * s - lo * s), s = 255 / (hi - lo), is one below the exact
  floor((ix - lo) * 255 / (hi - lo)): an exact integer rounded down by
  float64 (about 12 000 of the 8.4 million (lo, hi, ix))."""
  ix = np.arange(256, dtype=np.float64)[None, :]
  keys = []
  for width in range(1, 256):
    lo = np.arange(256 - width, dtype=np.float64)[:, None]
    scale = 255.0 / width
    pillow = np.floor(ix * scale + (-lo * scale))
    exact = np.floor_divide((ix - lo) * 255.0, width)
    rows, cols = np.nonzero((pillow != exact) & (exact >= 1) & (exact <= 255))
    keys.append(rows * 65536 + (rows + width) * 256 + cols)
  return np.sort(np.concatenate(keys)).astype(np.int32)


def auto_contrast(img, m, negate, bicubic, fill):
  """ImageOps.autocontrast: each channel's [lo, hi] stretched to [0, 255],
  with Pillow's float64 table reproduced exactly (`_auto_contrast_misses`)."""
  del m, negate, bicubic, fill
  lo = img.min(axis=(0, 1)).astype(jnp.int32)[:, None]
  hi = img.max(axis=(0, 1)).astype(jnp.int32)[:, None]
  levels = jnp.arange(256, dtype=jnp.int32)[None, :]
  exact = jnp.floor_divide((levels - lo) * 255, jnp.maximum(hi - lo, 1))
  misses = jnp.asarray(_auto_contrast_misses())
  key = lo * 65536 + hi * 256 + levels
  found = misses[jnp.clip(jnp.searchsorted(misses, key), 0, misses.size - 1)]
  table = exact - (found == key).astype(jnp.int32)
  return _lut(img, jnp.where(hi > lo, table, levels))


def equalize(img, m, negate, bicubic, fill):
  del m, negate, bicubic, fill
  index = img.astype(jnp.int32)
  tables = []
  for c in range(3):
    hist = jnp.bincount(index[..., c].reshape(-1), length=256)
    last = jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))
    step = (hist.sum() - hist[last]) // 255
    before = jnp.cumsum(hist) - hist
    table = (step // 2 + before) // jnp.maximum(step, 1)
    tables.append(jnp.where(step > 0, table, jnp.arange(256)))
  return _lut(img, jnp.stack(tables))


def invert(img, m, negate, bicubic, fill):
  del m, negate, bicubic, fill
  return 255.0 - img


def _posterize_bits(img, bits):
  shift = jnp.clip(8 - bits, 0, 8)
  mask = jnp.left_shift(jnp.int32(255), shift) & 255
  return (img.astype(jnp.int32) & mask).astype(jnp.float32)


def posterize(img, m, negate, bicubic, fill):
  del negate, bicubic, fill
  return _posterize_bits(img, _posterize_arg(m))


def posterize_increasing(img, m, negate, bicubic, fill):
  del negate, bicubic, fill
  return _posterize_bits(img, 4 - _posterize_arg(m))


def _solarize_threshold(img, threshold):
  return jnp.where(img < threshold, img, 255.0 - img)


def solarize(img, m, negate, bicubic, fill):
  del negate, bicubic, fill
  return _solarize_threshold(img, _solarize_arg(m))


def solarize_increasing(img, m, negate, bicubic, fill):
  del negate, bicubic, fill
  return _solarize_threshold(img, 256 - _solarize_arg(m))


def solarize_add(img, m, negate, bicubic, fill):
  del negate, bicubic, fill
  add = jnp.minimum(128, jnp.floor(_scaled(m, 110.0, 1.0)).astype(jnp.int32))
  return jnp.where(img < 128, jnp.minimum(255.0, img + add), img)


def _color(img, factor):
  return _blend(_luma(img), img, factor)


def _contrast(img, factor):
  luma = _luma(img).astype(jnp.int32)
  # int(mean + 0.5) of the L image, in integers.
  mean = (2 * luma.sum() + luma.size) // (2 * luma.size)
  return _blend(mean.astype(jnp.float32), img, factor)


def _brightness(img, factor):
  return _blend(jnp.zeros_like(img), img, factor)


def _sharpness(img, factor):
  """Pillow's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1) / 13 as the degenerate,
  summed as Pillow sums it in float32 (+ 0.5, row below first); the border
  pixels keep their values."""
  one = np.float32(1.0) / np.float32(13.0)
  five = np.float32(5.0) / np.float32(13.0)
  below, middle, above = img[2:], img[1:-1], img[:-2]

  def kernel_row(rows, centre):
    left, mid, right = _rounded(
        (rows[:, :-2] * one, rows[:, 1:-1] * centre, rows[:, 2:] * one))
    return left + mid + right

  total = jnp.float32(0.5) + kernel_row(below, one)
  total = total + kernel_row(middle, five)
  total = total + kernel_row(above, one)
  smooth = img.at[1:-1, 1:-1].set(_to_uint8(total))
  return _blend(smooth, img, factor)


def _enhance_op(enhance, magnitude_to_factor):
  """An ImageEnhance op of the RandAugment table: `enhance(img, factor)`
  at the factor timm's magnitude rule gives."""

  def op(img, m, negate, bicubic, fill):
    del bicubic, fill
    return enhance(img, magnitude_to_factor(m, negate))

  return op


color = _enhance_op(_color, _enhance_arg)
color_increasing = _enhance_op(_color, _enhance_increasing_arg)
contrast = _enhance_op(_contrast, _enhance_arg)
contrast_increasing = _enhance_op(_contrast, _enhance_increasing_arg)
brightness = _enhance_op(_brightness, _enhance_arg)
brightness_increasing = _enhance_op(_brightness, _enhance_increasing_arg)
sharpness = _enhance_op(_sharpness, _enhance_arg)
sharpness_increasing = _enhance_op(_sharpness, _enhance_increasing_arg)

# --- geometric ops: Pillow's Image.transform(AFFINE) ---------------------


def _cubic(v1, v2, v3, v4, d):
  """Pillow's BICUBIC kernel (a = -1) through four samples."""
  p2 = v3 - v1
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = v2 - v1 + v4 - v3
  return v2 + d * (p2 + d * (p3 + d * p4))


def _affine(img, matrix, bicubic, fill):
  """Output pixel (x, y) samples the input at matrix @ (x + .5, y + .5, 1),
  Pillow's AFFINE rule; samples outside the image take the fill colour."""
  h, w = img.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                        jnp.arange(w, dtype=jnp.float32) + 0.5,
                        indexing="ij")
  a0, a1, a2, a3, a4, a5 = (jnp.asarray(v, jnp.float32) for v in matrix)
  src_x = a0 * xs + a1 * ys + a2
  src_y = a3 * xs + a4 * ys + a5
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  src_x, src_y = src_x - 0.5, src_y - 0.5
  x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
  dx, dy = (src_x - x0)[..., None], (src_y - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def at(row, col):
    return img[jnp.clip(y0 + row, 0, h - 1), jnp.clip(x0 + col, 0, w - 1)]

  def lerp(a, b, d):
    return a + (b - a) * d

  linear = lerp(lerp(at(0, 0), at(0, 1), dx), lerp(at(1, 0), at(1, 1), dx), dy)
  rows = [
      _cubic(at(r, -1), at(r, 0), at(r, 1), at(r, 2), dx) for r in (-1, 0, 1, 2)
  ]
  cubic = _cubic(*rows, dy)
  value = _to_uint8(jnp.where(bicubic, cubic, linear))
  return jnp.where(inside[..., None], value, jnp.asarray(fill, jnp.float32))


def rotate(img, m, negate, bicubic, fill):
  """Image.rotate(degrees) about (w / 2, h / 2), degrees +-30 m / 10."""
  h, w = img.shape[:2]
  degrees = _signed(m * 3.0, negate)  # m / 10 * 30
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = w / 2.0, h / 2.0
  matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos,
            cy + sin * cx - cos * cy)
  return _affine(img, matrix, bicubic, fill)


def shear_x(img, m, negate, bicubic, fill):
  factor = _signed(_scaled(m, 3.0, 10.0), negate)
  return _affine(img, (1.0, factor, 0.0, 0.0, 1.0, 0.0), bicubic, fill)


def shear_y(img, m, negate, bicubic, fill):
  factor = _signed(_scaled(m, 3.0, 10.0), negate)
  return _affine(img, (1.0, 0.0, 0.0, factor, 1.0, 0.0), bicubic, fill)


def translate_x_rel(img, m, negate, bicubic, fill):
  pixels = _signed(_scaled(m, 45.0 * img.shape[1], 100.0), negate)
  return _affine(img, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), bicubic, fill)


def translate_y_rel(img, m, negate, bicubic, fill):
  pixels = _signed(_scaled(m, 45.0 * img.shape[0], 100.0), negate)
  return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), bicubic, fill)


# Every op: (levels [H, W, 3], magnitude, negate, bicubic, fill) -> levels.
OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize_increasing,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize_increasing,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color_increasing,
    "Contrast": contrast,
    "ContrastIncreasing": contrast_increasing,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness_increasing,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness_increasing,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


def _draw_magnitude(key, spec: Spec):
  """timm's AugmentOp: gauss(m, mstd) (uniform(0, m) for inf), clipped to
  [0, mmax or 10]."""
  m = jnp.float32(spec.magnitude)
  if spec.magnitude_std == math.inf:
    m = jax.random.uniform(key, (), jnp.float32, 0.0, m)
  elif spec.magnitude_std > 0:
    m = m + spec.magnitude_std * jax.random.normal(key, (), jnp.float32)
  upper = spec.magnitude_max or _LEVEL_DENOM
  return jnp.clip(m, 0.0, upper)


def _augment_one(key, img, spec: Spec, fill):
  branches = tuple(OPS[name] for name in spec.transforms)
  for layer in range(spec.num_layers):
    keys = jax.random.split(jax.random.fold_in(key, layer), 5)
    index = jax.random.randint(keys[0], (), 0, len(branches))
    m = _draw_magnitude(keys[1], spec)
    negate = jax.random.bernoulli(keys[2])
    bicubic = jax.random.bernoulli(keys[3])
    out = jax.lax.switch(index,
                         [lambda *a, op=op: op(*a, fill) for op in branches],
                         img, m, negate, bicubic)
    img = jnp.where(jax.random.bernoulli(keys[4], spec.prob), out, img)
  return img


def randaugment(key, images: jax.Array, spec, fill=None) -> jax.Array:
  """RandAugment per example of float images [B, H, W, 3] in [0, 1].

  `spec` is a string ("rand-m9-mstd0.5") or a `Spec`; `fill` the RGB fill
  colour (0..255) of the geometric ops, by default `fill_color()` of the
  ImageNet mean (timm's create_transform default).
  """
  if isinstance(spec, str):
    spec = parse_spec(spec)
  fill = fill_color() if fill is None else tuple(fill)
  levels = jnp.round(images.astype(jnp.float32) * 255.0)
  keys = jax.random.split(key, images.shape[0])
  out = jax.vmap(lambda k, x: _augment_one(k, x, spec, fill))(keys, levels)
  return (out / 255.0).astype(images.dtype)

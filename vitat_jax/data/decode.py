"""Per-example decoding and host-side transforms (run in the loader's workers).

A `Transform` turns one encoded file, encoded bytes or decoded array into a
uint8 RGB image [S, S, 3]:

- "squash": resize the whole image to S x S (bilinear), the reference's
  ImageNet and Imagenette recipe (torchvision `Resize((S, S))`); the random
  pad-crop and flip then run on the device (`augment.random_crop_flip`).
- "random_resized_crop": torchvision's RandomResizedCrop(S, scale, ratio),
  bilinear; the flip runs on the device (`augment.flip`).
- "resize_center_crop": the shorter side to round(S / crop_pct) (256 for
  224), then the central S x S (torchvision Resize(256) + CenterCrop(224),
  RobustBench's "Res256Crop224").

JPEGs are decoded at reduced size where the output is much smaller than the
file (libjpeg's DCT scaling through PIL's `draft`, 1/2 to 1/8), which is
exact up to the resampling filter and several times faster than a full
decode. Grayscale, palette, CMYK and RGBA images are converted to RGB.
Nothing here imports JAX.
"""

import dataclasses
import io
import math
from typing import Optional, Union

import numpy as np
from PIL import Image

TRAIN_TRANSFORMS = ("squash", "random_resized_crop")
EVAL_TRANSFORMS = ("squash", "resize_center_crop")

# What PIL raises on undecodable input, beyond OSError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                 Image.DecompressionBombError)

Encoded = Union[str, bytes, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A host-side image transform; a plain, picklable value."""

  name: str = "squash"
  size: int = 0  # output H == W; 0 = the image's own
  scale: tuple[float, float] = (0.08, 1.0)  # random_resized_crop
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized_crop
  crop_pct: float = 0.875  # resize_center_crop: 224 / 256

  @property
  def is_random(self) -> bool:
    return self.name == "random_resized_crop"

  def __call__(self,
               encoded: Encoded,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """uint8 [size, size, 3]; raises one of DECODE_ERRORS on a bad file."""
    image = open_image(encoded)
    width, height = image.size
    if self.name == "random_resized_crop":
      box = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
      return _resize_box(image, box, self.size)
    if self.name == "resize_center_crop":
      return _resize_center_crop(image, self.size, self.crop_pct)
    size = self.size or width
    return _resize_box(image, (0, 0, width, height),
                       size,
                       height=self.size or height)


def open_image(encoded: Encoded) -> Image.Image:
  """A lazily decoded PIL image from a path, encoded bytes or a uint8 array."""
  if isinstance(encoded, np.ndarray):
    array = encoded.astype(np.uint8, copy=False)
    if array.ndim == 3 and array.shape[2] == 1:
      array = array[..., 0]
    return Image.fromarray(array)
  if isinstance(encoded, bytes):
    return Image.open(io.BytesIO(encoded))
  return Image.open(encoded)


def _rgb(image: Image.Image) -> Image.Image:
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I"):  # 16-bit grey: convert() would clip to 255
    image = Image.fromarray(
        np.clip(np.round(np.asarray(image, np.float64) / 257), 0,
                255).astype(np.uint8))
  if image.mode in ("RGBA", "LA") or (image.mode == "P" and
                                      "transparency" in image.info):
    # Composite on black, as torchvision's convert("RGB") drops alpha.
    return image.convert("RGBA").convert("RGB")
  return image.convert("RGB")  # L, P, CMYK, YCbCr, I;16, ...


def _draft(image: Image.Image, box, out_width: int, out_height: int):
  """Asks libjpeg for the smallest DCT scale that keeps `box` at least
  out_width x out_height; returns the box in the drafted image's pixels."""
  if image.format != "JPEG":
    return image, box
  width, height = image.size
  box_w, box_h = box[2] - box[0], box[3] - box[1]
  want = (max(1, math.ceil(width * out_width / box_w)),
          max(1, math.ceil(height * out_height / box_h)))
  # draft keeps the decoded size >= `want`, so no output pixel is upsampled
  # that the full decode would not also have upsampled.
  image.draft("RGB" if image.mode in ("RGB", "YCbCr") else image.mode, want)
  scale_x, scale_y = image.size[0] / width, image.size[1] / height
  return image, (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x,
                 box[3] * scale_y)


def _resize_box(image: Image.Image,
                box,
                size: int,
                height: Optional[int] = None) -> np.ndarray:
  height = height or size
  image, box = _draft(image, box, size, height)
  image = _rgb(image)
  full = (0, 0, *image.size)
  if tuple(box) == full and image.size == (size, height):
    return np.asarray(image, np.uint8)
  resized = image.resize((size, height), Image.BILINEAR, box=tuple(box))
  return np.asarray(resized, np.uint8)


def _resize_center_crop(image: Image.Image, size: int,
                        crop_pct: float) -> np.ndarray:
  width, height = image.size
  short = int(round(size / crop_pct))
  # torchvision Resize(short): the shorter side to `short`, aspect kept.
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  image, box = _draft(image, (0, 0, width, height), new_w, new_h)
  image = _rgb(image)
  resized = image.resize((new_w, new_h), Image.BILINEAR, box=tuple(box))
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(resized, np.uint8)[top:top + size, left:left + size]


def random_resized_crop_box(width: int, height: int, scale, ratio,
                            rng: np.random.Generator):
  """torchvision RandomResizedCrop.get_params: (left, top, right, bottom)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  # Fallback: the central crop at the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def header(path: str) -> Optional[tuple[int, int]]:
  """(width, height) of an image file from its header, or None if it is not
  an image PIL can open. Reads a few kB, decodes nothing."""
  try:
    with Image.open(path) as image:
      return image.size
  except DECODE_ERRORS:
    return None

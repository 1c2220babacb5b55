"""Extra training data mixed into every batch at a fixed fraction.

`data.extra` is '' (off), an `.npz` holding `image` (uint8 [N, H, W, 3])
and `label` (integers [N]), or an image folder `<extra>/<class>/*.png` whose
class folders are classes of the main set. With `data.extra_fraction` f in
(0, 1), each global batch of B rows takes E = floor(f B + 1/2) rows (f B
rounded half up) from the extra set and B - E from the main set
(`rows_per_batch`; `pipeline` does the mixing).

An uncompressed `.npz` (`np.savez`) is read in place: its members are
memory-mapped, nothing is loaded but the labels. Members of a compressed one
(`np.savez_compressed`) cannot be mapped and are loaded into memory.

The rules here are the data section's (`sources.check_config` and
`sources.load` call them); all failures are one line.
"""

import math
import os
import pathlib
import struct
import zipfile

from absl import logging
import numpy as np

from vitat_jax.errors import UserError

KEYS = ("image", "label")
_WHAT = ("pass an .npz with 'image' (uint8 [N, H, W, 3]) and 'label' (int "
         "[N]) arrays, or an image folder of <class>/*.png")
# A zip member's local header: signature, ..., name length, extra length.
_LOCAL_HEADER = struct.Struct("<4s22xHH")


def rows(fraction: float, batch_size: int) -> int:
  """Extra rows per global batch: fraction x batch_size, rounded half up."""
  return int(math.floor(fraction * batch_size + 0.5))


def rows_per_batch(fraction: float, batch_size: int, shards: int = 1) -> int:
  """`rows(fraction, batch_size)`, checked: at least one row from each set,
  and a multiple of `shards` (the devices) so each takes the same number of
  extra rows; else a one-line error naming a fraction that works."""
  count = rows(fraction, batch_size)
  if 0 < count < batch_size and count % shards == 0:
    return count
  choices = range(shards, batch_size - shards + 1, shards)
  if not choices:
    raise UserError(f"data.extra_fraction={fraction}: batch_size={batch_size} "
                    f"over {shards} devices has no room for rows of both sets; "
                    f"use batch_size >= {2 * shards}")
  problem = (f"which the {shards} devices do not share evenly"
             if 0 < count < batch_size else
             "none from data.extra" if count == 0 else "none from the main set")
  best = min(choices, key=lambda c: abs(c - fraction * batch_size))
  raise UserError(f"data.extra_fraction={fraction} takes {count} of the "
                  f"{batch_size} rows of a batch (fraction x batch_size, "
                  f"rounded half up), {problem}; use e.g. "
                  f"data.extra_fraction={_fraction_for(best, batch_size)} "
                  f"({best} of {batch_size})")


def _fraction_for(count: int, batch_size: int) -> str:
  """The shortest decimal fraction whose rows are `count`."""
  for digits in range(1, 18):
    text = f"{count / batch_size:.{digits}g}"
    if rows(float(text), batch_size) == count:
      return text
  return repr(count / batch_size)


def check_fields(path: str, fraction, on_disk: bool = True) -> None:
  """One-line errors for `data.extra` and `data.extra_fraction`, and (if
  `on_disk`) for the extra set's layout (an .npz's array headers, a
  folder's class folders), before anything is read."""
  if isinstance(fraction,
                bool) or not isinstance(fraction,
                                        (int, float, np.integer, np.floating)):
    raise UserError(f"data.extra_fraction={fraction!r} must be a number")
  if not path:
    if fraction:
      raise UserError(f"data.extra_fraction={fraction} without data.extra: "
                      "set data.extra or leave the fraction 0")
    return
  if not (math.isfinite(fraction) and 0 < fraction < 1):
    raise UserError(f"data.extra_fraction={fraction} must be in (0, 1): the "
                    "share of each batch taken from data.extra, e.g. 0.7")
  if not on_disk:
    return
  resolved = resolve(path)
  if resolved.is_dir():
    if not folder_classes(resolved):
      raise UserError(f"data.extra {resolved} has no class subfolders; put "
                      f"its images in {resolved}/<class>/*.png, or pass an "
                      ".npz with 'image' and 'label' arrays")
  else:
    check_shapes(resolved, npz_headers(resolved))


def resolve(path: str) -> pathlib.Path:
  """The extra set's resolved path; a one-line error if there is none."""
  resolved = pathlib.Path(path).expanduser().resolve()
  if not resolved.exists():
    raise UserError(f"data.extra {resolved} does not exist; {_WHAT}")
  return resolved


def folder_classes(root: pathlib.Path) -> tuple[str, ...]:
  """The class folders of an extra image folder, sorted."""
  return tuple(
      sorted(entry.name
             for entry in os.scandir(root)
             if entry.is_dir() and not entry.name.startswith(".")))


def check_folder_classes(root: pathlib.Path, class_names) -> None:
  """Every class folder of the extra set names a class of the main set."""
  unknown = sorted(set(folder_classes(root)) - set(class_names))
  if unknown:
    raise UserError(f"data.extra {root} has class folders the main set does "
                    f"not have: {', '.join(unknown[:5])}; use the main set's "
                    f"class names ({', '.join(list(class_names)[:5])}, ...)")


# -------------------------------------------------------------------- npz ---


def npz_headers(path: pathlib.Path) -> dict:
  """{key: (shape, dtype, fortran order, zip member)} of an .npz's arrays,
  read from their headers alone."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as error:
    raise UserError(f"data.extra {path} is not an .npz ({error}); "
                    f"{_WHAT}") from None
  headers = {}
  with archive:
    for info in archive.infolist():
      if not info.filename.endswith(".npy"):
        continue
      try:
        with archive.open(info) as member:
          headers[info.filename[:-4]] = (*_read_header(member), info)
      except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise UserError(f"data.extra {path}: {info.filename} is not a numpy "
                        f"array ({error}); {_WHAT}") from None
  return headers


def _read_header(stream):
  """(shape, dtype, fortran order) of the .npy array `stream` starts with."""
  version = np.lib.format.read_magic(stream)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
  else:
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
  return shape, dtype, fortran


def check_shapes(path: pathlib.Path, headers: dict) -> None:
  """The keys, dtypes and shapes an extra .npz needs."""
  missing = [key for key in KEYS if key not in headers]
  if missing:
    raise UserError(f"data.extra {path} has arrays "
                    f"{sorted(headers) or 'none'}, not {missing}; {_WHAT}")
  image_shape, image_dtype = headers["image"][:2]
  label_shape, label_dtype = headers["label"][:2]
  if image_dtype != np.uint8 or len(image_shape) != 4 or image_shape[3] != 3:
    raise UserError(f"data.extra {path}: 'image' is {image_dtype} "
                    f"{list(image_shape)}, not uint8 [N, H, W, 3]; {_WHAT}")
  if (not np.issubdtype(label_dtype, np.integer) or len(label_shape) != 1 or
      label_shape[0] != image_shape[0]):
    raise UserError(f"data.extra {path}: 'label' is {label_dtype} "
                    f"{list(label_shape)}, not integers [{image_shape[0]}] "
                    f"(one per image); {_WHAT}")
  if not image_shape[0]:
    raise UserError(f"data.extra {path} holds no images; {_WHAT}")


class NpzMember:
  """An uncompressed .npz member as a read-only array, mapped in place.

  Pickles as its location (worker processes map the file themselves), so
  no copy of the data travels and memory does not grow with it.
  """

  def __init__(self, path: str, offset: int, shape, dtype, fortran: bool):
    self.path, self.offset = str(path), int(offset)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.order = "F" if fortran else "C"
    self._array = None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index):
    if self._array is None:
      self._array = np.memmap(self.path,
                              self.dtype,
                              "r",
                              self.offset,
                              self.shape,
                              order=self.order)
    return np.asarray(self._array[index])

  def __getstate__(self):
    return {**self.__dict__, "_array": None}


def read_npz(path: pathlib.Path):
  """(images, labels) of a checked extra .npz: images mapped in place
  (an `NpzMember`) where the member is stored uncompressed, else loaded."""
  headers = npz_headers(path)
  check_shapes(path, headers)
  shape, dtype, fortran, info = headers["image"]
  if info.compress_type == zipfile.ZIP_STORED:
    images = NpzMember(path, _data_offset(path, info), shape, dtype, fortran)
    labels = NpzMember(path, _data_offset(path, headers["label"][3]),
                       *headers["label"][:3])[:]
  else:
    logging.warning(
        "data.extra %s is a compressed .npz: loading its %.1f GB of images "
        "into memory (an uncompressed one, np.savez, is read in place)", path,
        np.prod(shape) / 1e9)
    with np.load(path, allow_pickle=False) as arrays:
      images, labels = arrays["image"], arrays["label"]
  return images, np.asarray(labels)


def _data_offset(path: pathlib.Path, info: zipfile.ZipInfo) -> int:
  """Where the array data of a stored (uncompressed) member starts."""
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(
        f.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
      raise UserError(f"data.extra {path} is a damaged .npz; {_WHAT}")
    f.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    _read_header(f)
    return f.tell()


def check_arrays(path: pathlib.Path, images, labels: np.ndarray,
                 image_size: int, num_classes: int, squash: bool) -> None:
  """Checks that need the main set: the image size (which squash-trained
  arrays must already have) and the label range."""
  height, width = images.shape[1:3]
  if squash and (height, width) != (image_size, image_size):
    raise UserError(f"data.extra {path} images are {height}x{width}, the main "
                    f"set's {image_size}x{image_size}: resize them to "
                    f"{image_size} px")
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= num_classes:
    bad = low if low < 0 else high
    raise UserError(f"data.extra {path} has label {bad}, outside the main "
                    f"set's {num_classes} classes [0, {num_classes - 1}]")

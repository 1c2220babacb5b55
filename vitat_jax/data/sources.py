"""Random-access image splits: scikit-learn digits, image folders and tfds.

`load(data_config)` turns the `data` part of a config into `DataSplits`: a
train and a test `Source` plus what the model needs to know about them
(classes, image size, normalisation statistics). Every source hands out
uint8 RGB images [B, H, W, 3] and int32 labels [B] for any indices, so the
pipeline can shuffle, shard and resume by index alone.

- "digits": scikit-learn's 1797 8x8 digits, shipped with the package; the
  default, as it needs no download.
- "image_folder": `root/{train,test}/<class>/*.(jpg|jpeg|png)`, decoded once
  with PIL and cached as a `.npz` (keyed by the file list) in `cache_dir`.
- "tfds": a prepared tfds dataset read through `tfds.data_source` (random
  access over array_record files; TensorFlow is not needed).
"""

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import time
from typing import Any, Optional, Protocol, Sequence

from absl import logging
import numpy as np
from PIL import Image

from vitat_jax.errors import UserError

VALID_NAMES = ("digits", "image_folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

DIGITS_NUM_TRAIN = 1437
DIGITS_DEFAULT_SIZE = 16
# A decoded folder is only worth keeping if nearly every file in it decodes.
MAX_CORRUPT_FRACTION = 0.01
# Bump when the cached arrays change meaning, so stale caches are not reused.
_CACHE_VERSION = 1


class Source(Protocol):
  """A random-access split."""

  def __len__(self) -> int:
    ...

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, H, W, 3] and int32 labels [B] for those indices."""
    ...


# eq=False: the generated __eq__/__hash__ would compare arrays elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory."""

  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or (
        self.images.shape[-1] != 3):
      raise ValueError("images must be uint8 [N, H, W, 3], got "
                       f"{self.images.dtype} {self.images.shape}")
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"labels {self.labels.shape} do not match images "
                       f"{self.images.shape}")

  def __len__(self) -> int:
    return len(self.labels)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    labels = self.labels[indices].astype(np.int32, copy=False)
    return self.images[indices], labels


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """A split of a prepared tfds dataset, decoded batch by batch.

  Attributes:
    data_source: what `tfds.data_source` returns (any sequence of
      {"image": uint8 HWC, "label": int} records works).
    image_size: output height and width; records of another size are resized
      (PIL bilinear), grayscale ones repeated to 3 channels.
    record_indices: the records this split exposes, in order (a subset), or
      None for all of them.
  """

  data_source: Any
  image_size: int
  record_indices: Optional[np.ndarray] = None

  def __len__(self) -> int:
    if self.record_indices is not None:
      return len(self.record_indices)
    return len(self.data_source)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    if self.record_indices is not None:
      indices = self.record_indices[indices]
    # One record at a time: under tfds.testing.mock_data the data source's
    # batched __getitems__ is broken (an unbound mock attribute).
    records = [self.data_source[int(i)] for i in indices]
    images = np.empty((len(records), self.image_size, self.image_size, 3),
                      np.uint8)
    for row, record in enumerate(records):
      images[row] = _as_rgb(np.asarray(record["image"]), self.image_size)
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return images, labels


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """The two splits of a dataset and what a model needs to know about them."""

  train: Source
  test: Source
  num_classes: int
  image_size: int  # H == W
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  class_names: tuple[str, ...]


def load(data_config) -> DataSplits:
  """Builds the train and test sources that `data_config` describes.

  Args:
    data_config: a ConfigDict (or any attribute object) with `name` and the
      optional fields `root`, `tfds_name`, `tfds_data_dir`, `train_split`,
      `test_split`, `image_size`, `train_examples`, `test_examples`,
      `subset_seed`, `cache_dir`, `mean`, `std`; missing or empty ones take
      their defaults.

  Returns:
    The splits. Train and test subsets (`*_examples` > 0) are class-balanced.

  Raises:
    UserError: a bad field, missing or unusable data.
  """
  name = _get(data_config, "name", "digits")
  if name not in VALID_NAMES:
    raise UserError(f"unknown data.name {name!r}; use one of: "
                    f"{', '.join(VALID_NAMES)}")
  image_size = _get_int(data_config, "image_size", 0)
  subset = dict(train=_get_int(data_config, "train_examples", 0),
                test=_get_int(data_config, "test_examples", 0),
                seed=_get_int(data_config, "subset_seed", 0))
  mean = _get_stats(data_config, "mean")
  std = _get_stats(data_config, "std")
  if std is not None and min(std) <= 0:
    raise UserError(f"data.std must be positive, got {std}")

  if name == "digits":
    splits = _load_digits(image_size, **subset)
  elif name == "image_folder":
    splits = _load_image_folder(
        root=_get(data_config, "root", ""), image_size=image_size,
        cache_dir=_get(data_config, "cache_dir", "") or _default_cache_dir(),
        **subset)
  else:
    splits = _load_tfds(
        tfds_name=_get(data_config, "tfds_name", ""),
        data_dir=_get(data_config, "tfds_data_dir", "") or None,
        split_names=(_get(data_config, "train_split", "train"),
                     _get(data_config, "test_split", "test")),
        image_size=image_size, **subset)
  if mean is not None:
    splits = dataclasses.replace(splits, mean=mean)
  if std is not None:
    splits = dataclasses.replace(splits, std=std)
  return splits


# ----------------------------------------------------------------- config ---


def _get(config, field: str, default):
  """`config.field`, or `default` when it is missing or None."""
  if hasattr(config, "get"):
    value = config.get(field, default)
  else:
    value = getattr(config, field, default)
  return default if value is None else value


def _get_int(config, field: str, default: int) -> int:
  value = _get(config, field, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < 0):
    raise UserError(f"data.{field} must be an integer >= 0, got {value!r}")
  return int(value)


def _get_stats(config, field: str) -> Optional[tuple[float, float, float]]:
  value = _get(config, field, None)
  if value is None or (not isinstance(value, str) and len(value) == 0):
    return None
  try:
    stats = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    stats = ()
  if len(stats) != 3:
    raise UserError(f"data.{field} must be 3 numbers (one per RGB channel) or "
                    f"empty for the dataset default, got {value!r}")
  return stats


def default_stats(dataset_name: str) -> tuple[tuple[float, ...], ...]:
  """(mean, std) for a dataset or folder name: CIFAR's own, else ImageNet's."""
  compact = dataset_name.lower().replace("-", "").replace("_", "")
  if "cifar100" in compact:
    return CIFAR100_STATS
  if "cifar10" in compact:
    return CIFAR10_STATS
  return IMAGENET_STATS


def _default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "vitat_jax")


def balanced_subset(labels: np.ndarray, num_examples: int, num_classes: int,
                    seed: int, what: str) -> np.ndarray:
  """Sorted indices of num_examples // num_classes random examples per class.

  A class with fewer examples contributes all it has (with a warning).
  """
  per_class = num_examples // num_classes
  if per_class == 0:
    raise UserError(f"{what}={num_examples} is fewer than the {num_classes} "
                    f"classes; use 0 for all examples or at least "
                    f"{num_classes}")
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      logging.warning("%s=%d asks for %d examples of class %d, which has only "
                      "%d; taking them all", what, num_examples, per_class,
                      label, len(members))
    take = min(per_class, len(members))
    chosen.append(rng.choice(members, size=take, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def _maybe_subset(labels: np.ndarray, num_examples: int, num_classes: int,
                  seed: int, what: str) -> Optional[np.ndarray]:
  """Indices of the balanced subset, or None when all examples are used."""
  if num_examples == 0:
    return None
  return balanced_subset(labels, num_examples, num_classes, seed, what)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize of a uint8 HW or HWC image to size x size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  squeezed = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
  resized = Image.fromarray(squeezed).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.uint8).reshape(size, size, *image.shape[2:])


def _as_rgb(image: np.ndarray, size: int) -> np.ndarray:
  """A uint8 HW, HW1, HW3 or HW4 image as size x size x 3."""
  image = _resize(image.astype(np.uint8, copy=False), size)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


# ----------------------------------------------------------------- digits ---


def _load_digits(image_size: int, train: int, test: int,
                 seed: int) -> DataSplits:
  """scikit-learn's digits, 1437 train / 360 test after a fixed shuffle."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  size = image_size or DIGITS_DEFAULT_SIZE
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  native = gray.shape[1]
  if size % native == 0:
    factor = size // native
    gray = gray.repeat(factor, axis=1).repeat(factor, axis=2)
  else:
    gray = np.stack([_resize(image, size) for image in gray])
  images = np.repeat(gray[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)

  order = np.random.default_rng(0).permutation(len(labels))
  parts = {"train": order[:DIGITS_NUM_TRAIN], "test": order[DIGITS_NUM_TRAIN:]}
  sources = {}
  for split, wanted in (("train", train), ("test", test)):
    indices = parts[split]
    keep = _maybe_subset(labels[indices], wanted, 10, seed,
                         f"data.{split}_examples")
    if keep is not None:
      indices = indices[keep]
    sources[split] = ArraySource(images[indices], labels[indices])
  mean, std = DIGITS_STATS
  return DataSplits(train=sources["train"], test=sources["test"],
                    num_classes=10, image_size=size, mean=mean, std=std,
                    class_names=tuple(str(d) for d in range(10)))


# ----------------------------------------------------------- image folder ---


def _load_image_folder(root: str, image_size: int, cache_dir: str, train: int,
                       test: int, seed: int) -> DataSplits:
  """Decodes (or reads from the cache) root/train and root/test."""
  if not root:
    raise UserError("data.root is empty; set it to a folder holding "
                    "train/<class>/*.jpg and test/<class>/*.jpg")
  root_path = pathlib.Path(root).expanduser().resolve()
  if not root_path.is_dir():
    raise UserError(f"data.root {root_path} is not a directory; point it at a "
                    "folder holding train/<class>/ and test/<class>/ images")
  for split in ("train", "test"):
    if not (root_path / split).is_dir():
      raise UserError(f"{root_path / split} is missing; an image folder needs "
                      "train/<class>/*.jpg and test/<class>/*.jpg")
  class_names = _class_folders(root_path / "train")
  if not class_names:
    raise UserError(f"{root_path / 'train'} has no class subfolders; put the "
                    "images in train/<class>/*.jpg")
  test_classes = _class_folders(root_path / "test")
  if test_classes != class_names:
    missing = sorted(set(class_names) ^ set(test_classes))
    raise UserError(f"{root_path / 'test'} and {root_path / 'train'} must hold "
                    f"the same class folders; they differ in: "
                    f"{', '.join(missing)}")

  # List (and pick subsets) before anything is decoded.
  listings = {}
  for split, wanted in (("train", train), ("test", test)):
    files, labels = _list_images(root_path / split, class_names)
    keep = _maybe_subset(labels, wanted, len(class_names), seed,
                         f"data.{split}_examples")
    if keep is not None:
      files, labels = [files[i] for i in keep], labels[keep]
    listings[split] = (files, labels)

  sources = {}
  for split, (files, labels) in listings.items():
    sources[split] = _decode_split_cached(root_path, split, files, labels,
                                          image_size, pathlib.Path(cache_dir))
  sizes = {sources[s].images.shape[1:3] for s in sources}
  if len(sizes) != 1:
    raise UserError(f"train and test images under {root_path} differ in size "
                    f"({' vs '.join(str(s) for s in sizes)}); set "
                    "data.image_size to resize them")
  mean, std = default_stats(root_path.name)
  return DataSplits(train=sources["train"], test=sources["test"],
                    num_classes=len(class_names),
                    image_size=sources["train"].images.shape[1],
                    mean=mean, std=std, class_names=class_names)


def _class_folders(split_dir: pathlib.Path) -> tuple[str, ...]:
  return tuple(sorted(entry.name for entry in os.scandir(split_dir)
                      if entry.is_dir() and not entry.name.startswith(".")))


def _list_images(split_dir: pathlib.Path,
                 class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Image paths (sorted within each class) and their class indices."""
  files, labels = [], []
  for label, class_name in enumerate(class_names):
    for dirpath, dirnames, filenames in os.walk(split_dir / class_name):
      dirnames.sort()
      for filename in sorted(filenames):
        if (filename.lower().endswith(IMAGE_EXTENSIONS) and
            not filename.startswith(".")):
          if not os.path.isfile(os.path.join(dirpath, filename)):
            raise UserError(f"{os.path.join(dirpath, filename)} is a broken "
                            "or looping symbolic link: fix or delete it")
          files.append(os.path.join(dirpath, filename))
          labels.append(label)
  if not files:
    raise UserError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under "
                    f"{split_dir}/<class>/; add images or fix data.root")
  empty = sorted(set(class_names) - {class_names[i] for i in set(labels)})
  if empty:  # a head trained on a class with no examples
    raise UserError(f"class folder {split_dir / empty[0]} has no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images: add images or "
                    "remove the folder")
  return files, np.asarray(labels, np.int32)


def _cache_path(root: pathlib.Path, split: str, files: Sequence[str],
                image_size: int, cache_dir: pathlib.Path) -> pathlib.Path:
  """A cache file name that changes whenever a listed file does."""
  digest = hashlib.sha256(
      f"{_CACHE_VERSION}\0{root}\0{split}\0{image_size}\0{len(files)}\n"
      .encode())
  for path in files:
    stat = os.stat(path)
    digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0"
                  f"{stat.st_mtime_ns}\n".encode())
  name = f"{root.name}-{split}-{image_size}-{digest.hexdigest()[:24]}.npz"
  return cache_dir / "image_folder" / name


def _decode_split_cached(root: pathlib.Path, split: str, files: list[str],
                         labels: np.ndarray, image_size: int,
                         cache_dir: pathlib.Path) -> ArraySource:
  cache_path = _cache_path(root, split, files, image_size, cache_dir)
  cached = _read_cache(cache_path)
  if cached is not None:
    images, labels, num_corrupt = cached
    logging.info("Read %d %s images of %s from the cache %s", len(labels),
                 split, root, cache_path)
  else:
    start = time.perf_counter()
    images, labels, num_corrupt = _decode_images(files, labels, image_size,
                                                 root / split)
    logging.info("Decoded %d %s images of %s in %.1f s", len(labels), split,
                 root, time.perf_counter() - start)
    _write_cache(cache_path, images, labels, num_corrupt)
  if num_corrupt:
    logging.warning("Skipped %d of %d image files under %s that could not be "
                    "decoded", num_corrupt, len(labels) + num_corrupt,
                    root / split)
  return ArraySource(images, labels)


def _decode_image(path: str, image_size: int) -> Optional[np.ndarray]:
  """The RGB image at `path`, resized if needed; None if it does not decode."""
  try:
    with Image.open(path) as image:
      if image.mode.startswith("I"):  # 16-bit grey: convert() would clip
        image = Image.fromarray(np.clip(np.round(
            np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
      image = image.convert("RGB")
      if image_size and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(image, np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None


def _decode_images(files: Sequence[str], labels: np.ndarray, image_size: int,
                   split_dir: pathlib.Path):
  """Decodes files into one uint8 array, skipping (few) undecodable files.

  Serial on purpose: on 2 cores a thread pool made the CIFAR-10 decode slower
  (PIL holds the GIL for most of a tiny JPEG's decode) and a process pool
  needs a `__main__` guard in every calling script.
  """
  max_corrupt = int(MAX_CORRUPT_FRACTION * len(files))
  images = None
  kept = np.zeros(len(files), bool)
  corrupt_examples = []
  for i, path in enumerate(files):
    image = _decode_image(path, image_size)
    if image is None:
      corrupt_examples.append(path)
      if len(corrupt_examples) > max_corrupt:
        raise UserError(
            f"more than {MAX_CORRUPT_FRACTION:.0%} of the {len(files)} image "
            f"files under {split_dir} do not decode (e.g. "
            f"{corrupt_examples[0]}); fix or delete them")
      continue
    if images is None:
      if image.shape[0] != image.shape[1]:
        raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]}, not "
                        "square; set data.image_size to resize the images")
      images = np.empty((len(files), *image.shape), np.uint8)
    elif image.shape != images.shape[1:]:
      raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]} but "
                      f"earlier images are {images.shape[2]}x"
                      f"{images.shape[1]}; set data.image_size to resize them")
    images[i] = image
    kept[i] = True
  if images is None:
    raise UserError(f"none of the {len(files)} image files under {split_dir} "
                    "decode; check that they are valid JPEG/PNG files")
  if kept.all():
    return images, labels, 0
  return images[kept], labels[kept], int((~kept).sum())


def _read_cache(path: pathlib.Path):
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as cache:
      return cache["images"], cache["labels"], int(cache["num_corrupt"])
  except Exception as error:  # pylint: disable=broad-except
    # Any unreadable cache is only a lost shortcut: decode again.
    logging.warning("Ignoring unreadable cache %s (%s)", path, error)
    return None


def _write_cache(path: pathlib.Path, images: np.ndarray, labels: np.ndarray,
                 num_corrupt: int):
  """Writes the arrays atomically, so readers never see a partial file."""
  tmp_name = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem,
                                     suffix=".tmp", delete=False) as tmp:
      tmp_name = tmp.name
      np.savez(tmp, images=images, labels=labels,
               num_corrupt=np.int64(num_corrupt))
    os.replace(tmp_name, path)
  except OSError as error:
    # A read-only cache costs time, not correctness.
    logging.warning("Could not write the image cache %s (%s)", path, error)
    if tmp_name and os.path.exists(tmp_name):
      os.remove(tmp_name)


# ------------------------------------------------------------------- tfds ---


def _load_tfds(tfds_name: str, data_dir: Optional[str],
               split_names: tuple[str, str], image_size: int, train: int,
               test: int, seed: int) -> DataSplits:
  """Opens a prepared tfds dataset for random access."""
  if not tfds_name:
    raise UserError("data.tfds_name is empty; set it, e.g. "
                    "data.tfds_name=cifar10")
  # Imported here: tfds takes seconds to import and only this source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_sources = [_open_tfds_split(tfds, tfds_name, split, data_dir)
                  for split in split_names]
  features = data_sources[0].dataset_info.features
  label_feature = features["label"] if "label" in features else None
  if "image" not in features or not hasattr(label_feature, "names"):
    raise UserError(f"tfds dataset {tfds_name!r} needs an 'image' and a class "
                    "'label' feature; use an image classification dataset")
  class_names = tuple(label_feature.names)

  if not image_size:
    height, width = features["image"].shape[:2]
    if height is None or height != width:
      raise UserError(f"tfds dataset {tfds_name!r} images are "
                      f"{height}x{width}, not one square size; set "
                      "data.image_size to resize them")
    image_size = int(height)

  sources = []
  for data_source, split, wanted in zip(data_sources, split_names,
                                        (train, test)):
    record_indices = None
    if wanted:
      labels = _read_tfds_labels(tfds, tfds_name, split, data_dir)
      record_indices = balanced_subset(labels, wanted, len(class_names), seed,
                                       f"data.{split}_examples")
    sources.append(TfdsSource(data_source, image_size, record_indices))
  mean, std = default_stats(tfds_name.split(":")[0].split("/")[0])
  return DataSplits(train=sources[0], test=sources[1],
                    num_classes=len(class_names), image_size=image_size,
                    mean=mean, std=std, class_names=class_names)


def _open_tfds_split(tfds, tfds_name: str, split: str, data_dir: Optional[str],
                     **kwargs):
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                            download=False, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown tfds dataset {tfds_name!r}; check "
                    "data.tfds_name (see tfds.list_builders())") from None
  except Exception as error:  # pylint: disable=broad-except
    # tfds signals "not prepared" with several unrelated exception types.
    raise UserError(_tfds_open_error(tfds, tfds_name, split, data_dir,
                                     error)) from None


def _tfds_open_error(tfds, tfds_name: str, split: str,
                     data_dir: Optional[str], error: Exception) -> str:
  """A one-line message for a dataset that `tfds.data_source` cannot open."""
  where = data_dir or "the default tfds data_dir"
  build = (f"`tfds build {tfds_name} --file_format=array_record"
           f"{' --data_dir=' + data_dir if data_dir else ''}`")
  try:
    prepared = tfds.builder(tfds_name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if not prepared:
    return (f"tfds dataset {tfds_name!r} is not prepared in {where}; prepare "
            f"it with {build} or use data.name=image_folder")
  text = str(error).strip()
  reason = text.splitlines()[0] if text else ""
  return (f"cannot read split {split!r} of tfds dataset {tfds_name!r} from "
          f"{where} ({type(error).__name__}: {reason}); check "
          f"data.train_split/test_split, or re-prepare it with {build} (random "
          "access needs the array_record format)")


def _read_tfds_labels(tfds, tfds_name: str, split: str,
                      data_dir: Optional[str]) -> np.ndarray:
  """All labels of a split, without decoding its images."""
  start = time.perf_counter()
  labels_only = _open_tfds_split(
      tfds, tfds_name, split, data_dir,
      decoders={"image": tfds.decode.SkipDecoding()})
  labels = np.asarray([int(labels_only[i]["label"])
                       for i in range(len(labels_only))], np.int32)
  logging.info("Read %d labels of %s[%s] in %.1f s", len(labels), tfds_name,
               split, time.perf_counter() - start)
  return labels

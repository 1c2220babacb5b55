"""Random-access image splits: scikit-learn digits, image folders and tfds.

`load(data_config)` turns the `data` part of a config into `DataSplits`: a
train and a test `Source` plus what the model needs to know about them
(classes, image size, normalisation statistics). Every source hands out one
uint8 RGB image [H, W, 3] and its label for any index (`example`), so the
loader (`pipeline`) can shuffle, shard and resume by index alone, and
decode in worker processes.

- "digits": scikit-learn's 1797 8x8 digits, shipped with the package; the
  default, as it needs no download. Held in memory (`ArraySource`).
- "image_folder": `root/{train,test}/<class>/*.(jpg|jpeg|png)`, indexed once
  and decoded per example (`folder.FileSource`); small splits are decoded
  once into memory instead (see `folder`).
- "tfds": a prepared tfds dataset read through `tfds.data_source` (random
  access over array_record files; TensorFlow is not needed), decoded per
  example.

The train split uses `data.train_transform`, the test split
`data.eval_transform` (see `decode`). `data.extra` adds a second training
set, mixed into each batch at `data.extra_fraction` (see `extra`).
"""

import dataclasses
import functools
import os
import pathlib
import time
from typing import Any, Callable, Optional, Protocol

from absl import logging
import numpy as np
from PIL import Image

from vitat_jax.data import decode
from vitat_jax.data import extra as extra_lib
from vitat_jax.data import folder
from vitat_jax.data import subsets
from vitat_jax.errors import UserError

VALID_NAMES = ("digits", "image_folder", "tfds")
EVAL_SUBSETS = ("", "robustbench")

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# data.stats names (configs/default.py); "" = the source's own.
NAMED_STATS = dict(cifar10=CIFAR10_STATS,
                   cifar100=CIFAR100_STATS,
                   imagenet=IMAGENET_STATS,
                   digits=DIGITS_STATS)

DIGITS_NUM_TRAIN = 1437
DIGITS_DEFAULT_SIZE = 16
DEFAULT_DECODED_CACHE_MB = 1024
# The fields of a data config and what a missing (or None) one means to
# `load`: one table, with the keys of configs/default.py's `data` section
# (tests/data/test_sources.py checks). The values are the library's own
# (the digits at their native size); the configs set the paper's recipe.
FIELDS = dict(name="digits",
              root="",
              tfds_name="",
              tfds_data_dir="",
              train_split="train",
              test_split="test",
              image_size=0,
              train_examples=0,
              test_examples=0,
              subset_seed=0,
              cache_dir="",
              mean=(),
              std=(),
              stats="",
              train_transform="squash",
              eval_transform="squash",
              rrc_scale=(0.08, 1.0),
              rrc_ratio=(3 / 4, 4 / 3),
              crop_pct=0.875,
              eval_subset="",
              workers=None,
              decoded_cache_mb=DEFAULT_DECODED_CACHE_MB,
              extra="",
              extra_fraction=0.0)


class Source(Protocol):
  """A random-access split."""

  def __len__(self) -> int:
    ...

  @property
  def needs_rng(self) -> bool:
    """Whether `example` draws random numbers (a random transform)."""
    ...

  def example(self, index: int, rng=None) -> tuple[np.ndarray, int]:
    """uint8 image [H, W, 3] and label of example `index`; `rng` is a
    numpy Generator when `needs_rng`."""
    ...

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, H, W, 3] and int32 labels [B] (no random transform;
    for tests and small sets)."""
    ...


# eq=False: the generated __eq__/__hash__ would compare arrays elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory, as final-size images unless `transform` is set."""

  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N]
  transform: Optional[decode.Transform] = None

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

  @property
  def needs_rng(self) -> bool:
    return self.transform is not None and self.transform.is_random

  def example(self, index: int, rng=None) -> tuple[np.ndarray, int]:
    image = self.images[index]
    if self.transform is not None:
      image = self.transform(image, rng)
    return image, int(self.labels[index])

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    labels = self.labels[indices].astype(np.int32, copy=False)
    if self.transform is None:
      return self.images[indices], labels
    return np.stack([self.example(int(i))[0] for i in indices]), labels


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """A split of a prepared tfds dataset, decoded example by example.

  Attributes:
    data_source: what `tfds.data_source` returns (any sequence of
      {"image": encoded bytes or uint8 HWC, "label": int} records works).
    transform: turns each record's image into the output (grayscale ones
      repeated to 3 channels).
    record_indices: the records this split exposes, in order (a subset), or
      None for all of them.
    label_reader: returns the labels of all records of the split, without
      decoding images (for `labels`), or None.
  """

  data_source: Any
  transform: decode.Transform
  record_indices: Optional[np.ndarray] = None
  label_reader: Optional[Callable[[], np.ndarray]] = None

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """The labels of this split's examples (read once, on first use)."""
    if self.label_reader is None:
      raise ValueError("this TfdsSource has no label_reader")
    labels = np.asarray(self.label_reader(), np.int32)
    if self.record_indices is not None:
      labels = labels[self.record_indices]
    return labels

  def __len__(self) -> int:
    if self.record_indices is not None:
      return len(self.record_indices)
    return len(self.data_source)

  @property
  def image_size(self) -> int:
    return self.transform.size

  @property
  def needs_rng(self) -> bool:
    return self.transform.is_random

  def example(self, index: int, rng=None) -> tuple[np.ndarray, int]:
    if self.record_indices is not None:
      index = self.record_indices[index]
    # One record at a time: under tfds.testing.mock_data the data source's
    # batched __getitems__ is broken (an unbound mock attribute).
    record = self.data_source[int(index)]
    image = record["image"]
    if not isinstance(image, bytes):
      image = np.asarray(image)
    return self.transform(image, rng), int(record["label"])

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    pairs = [self.example(int(i)) for i in indices]
    return (np.stack([p[0] for p in pairs]),
            np.asarray([p[1] for p in pairs], np.int32))


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """The two splits of a dataset and what a model needs to know about them
  (`train` is None when `load` was asked for the test split alone)."""

  train: Optional[Source]
  test: Source
  num_classes: int
  image_size: int  # H == W
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  class_names: tuple[str, ...]
  # `data.extra`'s training set (the main set's classes and image size), or
  # None.
  extra: Optional[Source] = None


def transforms(data_config, image_size: int):
  """(train, eval) `decode.Transform`s that `data_config` names."""
  train_name = _get(data_config, "train_transform")
  eval_name = _get(data_config, "eval_transform")
  if train_name not in decode.TRAIN_TRANSFORMS:
    raise UserError(f"data.train_transform={train_name!r}: use one of "
                    f"{', '.join(decode.TRAIN_TRANSFORMS)}")
  if eval_name not in decode.EVAL_TRANSFORMS:
    raise UserError(f"data.eval_transform={eval_name!r}: use one of "
                    f"{', '.join(decode.EVAL_TRANSFORMS)}")
  scale = tuple(float(v) for v in _get(data_config, "rrc_scale"))
  ratio = tuple(float(v) for v in _get(data_config, "rrc_ratio"))
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise UserError(f"data.rrc_scale={scale}: two numbers 0 < lo <= hi <= 1")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise UserError(f"data.rrc_ratio={ratio}: two numbers 0 < lo <= hi")
  crop_pct = float(_get(data_config, "crop_pct"))
  if not 0 < crop_pct <= 1:
    raise UserError(f"data.crop_pct={crop_pct}: use a number in (0, 1], e.g. "
                    "0.875 (224 of 256)")
  if (train_name != "squash" or eval_name != "squash") and not image_size:
    raise UserError(f"data.train_transform={train_name!r} / "
                    f"eval_transform={eval_name!r} need data.image_size > 0")
  return (decode.Transform(train_name, image_size, scale, ratio, crop_pct),
          decode.Transform(eval_name, image_size, scale, ratio, crop_pct))


def _fields(data_config):
  """(image_size, subset sizes and seed, mean, std, eval_subset), each read
  with its one-line error."""
  subset = dict(train=_get_int(data_config, "train_examples"),
                test=_get_int(data_config, "test_examples"),
                seed=_get_int(data_config, "subset_seed"))
  return (_get_int(data_config,
                   "image_size"), subset, _get_stats(data_config, "mean"),
          _get_stats(data_config, "std"), _get(data_config, "eval_subset"))


def check_config(data_config, with_extra: bool = True) -> None:
  """One-line errors for every field of a data config, before anything is
  read (the data section's one owner: `validate.check_config` and `load`
  call it). An image folder's layout is checked here too (a listing, no
  decoding), and `data.extra`'s unless `with_extra` is False (evaluation,
  which does not read it)."""
  name = _get(data_config, "name")
  if name not in VALID_NAMES:
    raise UserError(f"unknown dataset {name!r}: use one of "
                    f"{', '.join(VALID_NAMES)}")
  workers = _get(data_config, "workers")
  if workers is not None and (isinstance(workers, bool) or
                              not isinstance(workers,
                                             (int, np.integer)) or workers < 0):
    raise UserError(f"data.workers={workers!r}: use 0 (decode in the training "
                    "process), a positive number of worker processes, or "
                    "leave it unset for one per spare CPU")
  image_size, _, _, std, eval_subset = _fields(data_config)
  if std is not None and min(std) <= 0:
    raise UserError(f"data.std must be positive, got {std}")
  stats = _get(data_config, "stats")
  if stats and stats not in NAMED_STATS:
    raise UserError(f"data.stats={stats!r}: use one of "
                    f"{', '.join(NAMED_STATS)}, or '' for the source's own")
  if eval_subset not in EVAL_SUBSETS:
    raise UserError(f"data.eval_subset={eval_subset!r}: use '' (the whole "
                    "test split) or 'robustbench' (its 5000 ImageNet images)")
  if eval_subset and name != "image_folder":
    raise UserError("data.eval_subset=robustbench needs data.name="
                    "image_folder with ImageNet's val/ as root/test/ (the "
                    "subset is named by file)")
  transforms(data_config, image_size)
  if name == "tfds" and not _get(data_config, "tfds_name"):
    raise UserError("data.tfds_name is empty: name a TFDS data set, e.g. "
                    "--config.data.tfds_name=cifar10")
  if name == "image_folder":
    folder.check_root(_get(data_config, "root"))
  cache_dir = _get(data_config, "cache_dir")
  if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise UserError(f"data.cache_dir {cache_dir!r} is a file: pass a "
                    "directory or leave it empty")
  extra_lib.check_fields(_get(data_config, "extra"),
                         _get(data_config, "extra_fraction"),
                         on_disk=with_extra)


def extra_rows(data_config, batch_size: int, shards: int = 1) -> int:
  """Rows of each global batch of `batch_size` taken from `data.extra` (0
  when it is off): `extra_fraction` x `batch_size` rounded half up, a
  multiple of `shards` (the devices); else a one-line error."""
  if not _get(data_config, "extra"):
    return 0
  return extra_lib.rows_per_batch(_get(data_config, "extra_fraction"),
                                  batch_size, shards)


def load(data_config,
         with_extra: bool = True,
         *,
         train: bool = True) -> DataSplits:
  """Builds the train and test sources that `data_config` describes.

  Args:
    data_config: a ConfigDict (or any attribute object) with `name` and the
      optional fields `root`, `tfds_name`, `tfds_data_dir`, `train_split`,
      `test_split`, `image_size`, `train_examples`, `test_examples`,
      `subset_seed`, `cache_dir`, `mean`, `std`, `train_transform`,
      `eval_transform`, `rrc_scale`, `rrc_ratio`, `crop_pct`,
      `decoded_cache_mb`, `eval_subset`, `workers`, `extra`,
      `extra_fraction`; missing or empty ones take their defaults.
    with_extra: also build `data.extra`'s set (`DataSplits.extra`; training
      only needs it).
    train: False: the test split alone (evaluation); the train split is
      neither opened nor listed nor decoded (an image folder needs no
      train/), and `DataSplits.train` is None.

  Returns:
    The splits. Train and test subsets (`*_examples` > 0) are seeded and
    class-stratified (`subsets.stratified_subset`).

  Raises:
    UserError: a bad field, missing or unusable data.
  """
  check_config(data_config, with_extra)
  name = _get(data_config, "name")
  image_size, subset, mean, std, eval_subset = _fields(data_config)
  train_transform, eval_transform = transforms(data_config, image_size)

  wanted = ("train", "test") if train else ("test",)
  if name == "digits":
    splits = _load_digits(image_size, wanted=wanted, **subset)
  elif name == "image_folder":
    splits = _load_image_folder(root=_get(data_config, "root"),
                                transforms=(train_transform, eval_transform),
                                cache_dir=_get(data_config, "cache_dir") or
                                _default_cache_dir(),
                                cache_mb=_get_int(data_config,
                                                  "decoded_cache_mb"),
                                eval_subset=eval_subset,
                                wanted=wanted,
                                **subset)
  else:
    splits = _load_tfds(tfds_name=_get(data_config, "tfds_name"),
                        data_dir=_get(data_config, "tfds_data_dir") or None,
                        split_names=(_get(data_config, "train_split"),
                                     _get(data_config, "test_split")),
                        transforms=(train_transform, eval_transform),
                        wanted=wanted,
                        **subset)
  if train_transform.name != "squash" and isinstance(splits.train, ArraySource):
    splits = dataclasses.replace(splits,
                                 train=dataclasses.replace(
                                     splits.train, transform=train_transform))
  if eval_transform.name != "squash" and isinstance(splits.test, ArraySource):
    splits = dataclasses.replace(splits,
                                 test=dataclasses.replace(
                                     splits.test, transform=eval_transform))
  default_mean, default_std = source_default_stats(data_config)
  splits = dataclasses.replace(splits,
                               mean=default_mean if mean is None else mean,
                               std=default_std if std is None else std)
  if with_extra and _get(data_config, "extra"):
    splits = dataclasses.replace(splits,
                                 extra=_load_extra(data_config, splits,
                                                   train_transform))
  return splits


def _load_extra(data_config, splits: DataSplits, train_transform) -> Source:
  """`data.extra`'s set, read like the main train split (its transform at
  the main set's size) and checked against the main set's classes."""
  path = extra_lib.resolve(_get(data_config, "extra"))
  transform = dataclasses.replace(train_transform, size=splits.image_size)
  if path.is_dir():
    extra_lib.check_folder_classes(path, splits.class_names)
    files, labels = folder.list_images(path, splits.class_names)
    cache_path = pathlib.Path(
        _get(data_config, "cache_dir") or _default_cache_dir())
    files, labels, _ = folder.index_split(path.parent, path.name, files, labels,
                                          cache_path)
    return _folder_source(path.parent, path.name, files, labels, transform,
                          cache_path, _get_int(data_config, "decoded_cache_mb"))
  images, labels = extra_lib.read_npz(path)
  squash = transform.name == "squash"
  extra_lib.check_arrays(path, images, labels, splits.image_size,
                         splits.num_classes, squash)
  return ArraySource(images, labels.astype(np.int32),
                     None if squash else transform)


# ----------------------------------------------------------------- config ---


def _get(config, field: str):
  """`config.field`, or `FIELDS[field]` when it is missing or None."""
  default = FIELDS[field]
  if hasattr(config, "get"):
    value = config.get(field, default)
  else:
    value = getattr(config, field, default)
  return default if value is None else value


def _get_int(config, field: str) -> int:
  value = _get(config, field)
  if isinstance(
      value, bool) or not isinstance(value, (int, np.integer)) or (value < 0):
    raise UserError(f"data.{field}={value!r} must be an integer >= 0 (0: "
                    "the default)")
  return int(value)


def _get_stats(config, field: str) -> Optional[tuple[float, float, float]]:
  value = _get(config, field)
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
  """(mean, std) for a tfds data set name: CIFAR's own, else ImageNet's."""
  compact = dataset_name.lower().replace("-", "").replace("_", "")
  if "cifar100" in compact:
    return CIFAR100_STATS
  if "cifar10" in compact:
    return CIFAR10_STATS
  return IMAGENET_STATS


def source_default_stats(data_config) -> tuple[tuple[float, ...], ...]:
  """(mean, std) that `load(data_config)` uses where `data.mean` /
  `data.std` are empty, from the config alone: `data.stats` by name, else
  the digits' own, an image folder's ImageNet's (whatever the folder is
  called) or `default_stats` of the tfds name."""
  stats = _get(data_config, "stats")
  if stats:
    return NAMED_STATS[stats]
  name = _get(data_config, "name")
  if name == "digits":
    return DIGITS_STATS
  if name == "image_folder":
    return IMAGENET_STATS
  return default_stats(_tfds_base_name(_get(data_config, "tfds_name")))


def _tfds_base_name(tfds_name: str) -> str:
  """'cifar10:3.0.2' or 'cifar10/plain' -> 'cifar10'."""
  return tfds_name.split(":")[0].split("/")[0]


def _default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "vitat_jax")


def balanced_subset(labels: np.ndarray, num_examples: int, num_classes: int,
                    seed: int, what: str) -> np.ndarray:
  """Sorted indices of `subsets.stratified_subset`: num_examples //
  num_classes random examples per class, the remainder spread over classes
  drawn with the seed.

  A class with fewer examples contributes all it has (with a warning), the
  others the rest.
  """
  if num_examples < num_classes:
    raise UserError(f"{what}={num_examples} is fewer than the {num_classes} "
                    f"classes; use 0 for all examples or at least "
                    f"{num_classes}")
  per_class = num_examples // num_classes
  for label in range(num_classes):
    count = int((labels == label).sum())
    if count < per_class:
      logging.warning(
          "%s=%d asks for %d examples of class %d, which has only "
          "%d; taking them all", what, num_examples, per_class, label, count)
  return subsets.stratified_subset(labels, num_examples, seed, num_classes)


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


# ----------------------------------------------------------------- digits ---


def _load_digits(image_size: int,
                 train: int,
                 test: int,
                 seed: int,
                 wanted=("train", "test")) -> DataSplits:
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
  sources = {"train": None}
  for split, count in (("train", train), ("test", test)):
    if split not in wanted:
      continue
    indices = parts[split]
    keep = _maybe_subset(labels[indices], count, 10, seed,
                         f"data.{split}_examples")
    if keep is not None:
      indices = indices[keep]
    sources[split] = ArraySource(images[indices], labels[indices])
  mean, std = DIGITS_STATS
  return DataSplits(train=sources["train"],
                    test=sources["test"],
                    num_classes=10,
                    image_size=size,
                    mean=mean,
                    std=std,
                    class_names=tuple(str(d) for d in range(10)))


# ----------------------------------------------------------- image folder ---


def _load_image_folder(root: str,
                       transforms,
                       cache_dir: str,
                       cache_mb: int,
                       eval_subset: str,
                       train: int,
                       test: int,
                       seed: int,
                       wanted=("train", "test")) -> DataSplits:
  """Indexes root/train and root/test (or the `wanted` ones); decodes
  lazily unless small."""
  root_path, class_names = folder.check_layout(root, wanted)
  cache_path = pathlib.Path(cache_dir)
  # List, check headers and pick subsets before anything is decoded.
  listings = {}
  for split, count in (("train", train), ("test", test)):
    if split not in wanted:
      continue
    if split == "test" and eval_subset == "robustbench":
      files, labels = folder.robustbench_files(root_path / split, class_names)
    else:
      files, labels = folder.list_images(root_path / split,
                                         class_names,
                                         allow_empty_class=split != "train")
    files, labels, sizes = folder.index_split(root_path, split, files, labels,
                                              cache_path)
    keep = _maybe_subset(labels, count, len(class_names), seed,
                         f"data.{split}_examples")
    if keep is not None:
      files, labels, sizes = [files[i] for i in keep], labels[keep], sizes[keep]
    listings[split] = (files, labels, sizes)

  train_transform, eval_transform = transforms
  if not train_transform.size:
    native = {
        split: folder.native_size(files, sizes)
        for split, (files, _, sizes) in listings.items()
    }
    if len(set(native.values())) != 1:
      raise UserError(f"train and test images under {root_path} differ in "
                      f"size ({native['train']} vs {native['test']}); set "
                      "data.image_size to resize them")
    train_transform = dataclasses.replace(train_transform,
                                          size=native[wanted[0]])
    eval_transform = dataclasses.replace(eval_transform, size=native[wanted[0]])
  sources = {"train": None}
  for split, transform in (("train", train_transform), ("test",
                                                        eval_transform)):
    if split not in wanted:
      continue
    files, labels, _ = listings[split]
    sources[split] = _folder_source(root_path, split, files, labels, transform,
                                    cache_path, cache_mb)
  # `load` sets the config's statistics (data.mean/std, data.stats).
  mean, std = IMAGENET_STATS
  return DataSplits(train=sources["train"],
                    test=sources["test"],
                    num_classes=len(class_names),
                    image_size=train_transform.size,
                    mean=mean,
                    std=std,
                    class_names=class_names)


def _folder_source(root_path: pathlib.Path, split: str, files, labels,
                   transform, cache_path: pathlib.Path, cache_mb: int):
  """The indexed files of root_path/split: decoded once into memory when
  they fit in `cache_mb` (squash), else read file by file."""
  decoded_mb = len(files) * transform.size**2 * 3 / 2**20
  if transform.name == "squash" and decoded_mb <= cache_mb:
    images, labels = folder.decoded_split(root_path, split, files, labels,
                                          transform, cache_path)
    return ArraySource(images, labels)
  logging.info(
      "%s split of %s: %d images read file by file (%s, %.0f MB "
      "decoded > data.decoded_cache_mb=%d or a random "
      "transform)", split, root_path, len(files), transform.name, decoded_mb,
      cache_mb)
  return folder.FileSource(str(root_path / split), files, labels, transform)


# ------------------------------------------------------------------- tfds ---


def _load_tfds(tfds_name: str,
               data_dir: Optional[str],
               split_names: tuple[str, str],
               transforms,
               train: int,
               test: int,
               seed: int,
               wanted=("train", "test")) -> DataSplits:
  """Opens a prepared tfds dataset for random access (the `wanted` splits
  of train and test)."""
  # Imported here: tfds takes seconds to import and only this source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  roles = tuple(role for role in ("train", "test") if role in wanted)
  split_names = tuple(
      dict(zip(("train", "test"), split_names))[role] for role in roles)
  data_sources = [
      _open_tfds_split(tfds, tfds_name, split, data_dir)
      for split in split_names
  ]
  features = data_sources[0].dataset_info.features
  label_feature = features["label"] if "label" in features else None
  if "image" not in features or not hasattr(label_feature, "names"):
    raise UserError(f"tfds dataset {tfds_name!r} needs an 'image' and a class "
                    "'label' feature; use an image classification dataset")
  class_names = tuple(label_feature.names)
  if isinstance(features["image"], tfds.features.Image):
    data_sources = [
        _encoded_images(tfds, tfds_name, split, data_dir, plain)
        for split, plain in zip(split_names, data_sources)
    ]

  train_transform, eval_transform = transforms
  image_size = train_transform.size
  if not image_size:
    height, width = features["image"].shape[:2]
    if height is None or height != width:
      raise UserError(f"tfds dataset {tfds_name!r} images are "
                      f"{height}x{width}, not one square size; set "
                      "data.image_size to resize them")
    image_size = int(height)
    train_transform = dataclasses.replace(train_transform, size=image_size)
    eval_transform = dataclasses.replace(eval_transform, size=image_size)

  counts = {"train": train, "test": test}
  role_transforms = {"train": train_transform, "test": eval_transform}
  sources = {"train": None}
  for data_source, split, role in zip(data_sources, split_names, roles):
    count, transform = counts[role], role_transforms[role]
    record_indices = None
    label_reader = functools.partial(_read_labels_of_split, tfds_name, split,
                                     data_dir)
    if count:
      labels = label_reader()
      label_reader = functools.partial(np.asarray, labels)
      record_indices = balanced_subset(labels, count, len(class_names), seed,
                                       f"data.{role}_examples")
    sources[role] = TfdsSource(data_source, transform, record_indices,
                               label_reader)
  mean, std = default_stats(_tfds_base_name(tfds_name))
  return DataSplits(train=sources["train"],
                    test=sources["test"],
                    num_classes=len(class_names),
                    image_size=image_size,
                    mean=mean,
                    std=std,
                    class_names=class_names)


def _open_tfds_split(tfds, tfds_name: str, split: str, data_dir: Optional[str],
                     **kwargs):
  try:
    data_source = tfds.data_source(tfds_name,
                                   split=split,
                                   data_dir=data_dir,
                                   download=False,
                                   **kwargs)
    if len(data_source):
      # Files open lazily: a dataset prepared as tfrecord, or one whose
      # array_record files are gone, fails here rather than in a worker;
      # a truncated file reads as records of None (each file's last record
      # is read: truncation loses the tail).
      for index in _last_records(data_source, split):
        record = data_source[index]
        if not isinstance(record, dict) or any(
            value is None for value in record.values()):
          raise UserError(
              f"record {index} of split {split!r} of tfds dataset "
              f"{tfds_name!r} in {data_dir or 'the default tfds data_dir'} "
              "cannot be read (is one of its files truncated?): prepare it "
              f"again with `tfds build {tfds_name} "
              "--file_format=array_record`")
    return data_source
  except UserError:
    raise
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown tfds dataset {tfds_name!r}; check "
                    "data.tfds_name (see tfds.list_builders())") from None
  except Exception as error:  # pylint: disable=broad-except
    # tfds signals "not prepared" with several unrelated exception types.
    raise UserError(_tfds_open_error(tfds, tfds_name, split, data_dir,
                                     error)) from None


def _last_records(data_source, split: str) -> list:
  """The index of the first record and of each file's last one (by the
  split's file instructions; the split's last record where they are not
  known)."""
  indices = {0, len(data_source) - 1}
  try:
    end = 0
    for instruction in data_source.dataset_info.splits[split].file_instructions:
      end += instruction.take
      indices.add(min(end, len(data_source)) - 1)
  except Exception:  # pylint: disable=broad-except
    pass  # a split expression or a mock without file instructions
  return sorted(i for i in indices if i >= 0)


def _tfds_open_error(tfds, tfds_name: str, split: str, data_dir: Optional[str],
                     error: Exception) -> str:
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


def _encoded_images(tfds, tfds_name: str, split: str, data_dir: Optional[str],
                    plain):
  """The split with its images left encoded (decoded later in the workers,
  at reduced size for JPEGs), where tfds can do that; else `plain`."""
  try:
    encoded = _open_tfds_split(tfds,
                               tfds_name,
                               split,
                               data_dir,
                               decoders={"image": tfds.decode.SkipDecoding()})
    if len(encoded) and isinstance(encoded[0]["image"], bytes):
      return encoded
  except Exception:  # pylint: disable=broad-except
    pass  # e.g. tfds.testing.mock_data, which needs TensorFlow for this
  return plain


def _read_labels_of_split(tfds_name: str, split: str,
                          data_dir: Optional[str]) -> np.ndarray:
  """`_read_tfds_labels`, importing tfds (picklable, for `TfdsSource`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return _read_tfds_labels(tfds, tfds_name, split, data_dir)


def _read_tfds_labels(tfds, tfds_name: str, split: str,
                      data_dir: Optional[str]) -> np.ndarray:
  """All labels of a split, without decoding its images."""
  start = time.perf_counter()
  labels_only = _open_tfds_split(tfds,
                                 tfds_name,
                                 split,
                                 data_dir,
                                 decoders={"image": tfds.decode.SkipDecoding()})
  labels = np.asarray(
      [int(labels_only[i]["label"]) for i in range(len(labels_only))], np.int32)
  logging.info("Read %d labels of %s[%s] in %.1f s", len(labels), tfds_name,
               split,
               time.perf_counter() - start)
  return labels

"""Image folders: `root/{train,test}/<class>/*.(jpg|jpeg|png)`, read lazily.

A split is listed once and its file headers are checked once (files that
are not images are skipped with a count, and more than
MAX_CORRUPT_FRACTION of them is an error); the result is cached in
`cache_dir` under a key that changes whenever a listed file does. Images
are then decoded one by one in the loader's workers (`FileSource`), so the
loader's memory does not grow with the number of images. A split small
enough (`data.decoded_cache_mb`) and with a deterministic transform
("squash") is instead decoded once into a uint8 array and cached as `.npz`
(CIFAR-sized sets: decoding 32x32 PNGs costs more than training on them).
"""

import hashlib
import os
import pathlib
import tempfile
import time
from typing import Sequence

from absl import logging
import numpy as np

from vitat_jax.data import decode
from vitat_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# A folder is only usable if nearly every file in it is an image.
MAX_CORRUPT_FRACTION = 0.01
# A file that fails to decode in a worker is replaced by the next record;
# after this many reads, more than MAX_CORRUPT_FRACTION of failures stops.
_MIN_READS_FOR_FRACTION = 100
# Bump when the cached arrays change meaning, so stale caches are not reused.
_CACHE_VERSION = 2


class FileSource:
  """A split read file by file: decoded and transformed per example.

  The relative paths are kept as one byte string plus offsets, so a copy per
  worker process costs tens of MB for ImageNet, not a Python list of 1.28M
  strings.
  """

  def __init__(self, root: str, files: Sequence[str], labels: np.ndarray,
               transform: decode.Transform):
    self.root = str(root)
    encoded = [os.path.relpath(f, root).encode() for f in files]
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    self._paths = b"".join(encoded)
    self.labels = np.asarray(labels, np.int32)
    self.transform = transform
    self._reads = 0
    self._failures = 0

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def needs_rng(self) -> bool:
    return self.transform.is_random

  def path(self, index: int) -> str:
    start, stop = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.root, self._paths[start:stop].decode())

  def example(self, index: int, rng=None) -> tuple[np.ndarray, int]:
    """The transformed image and label of file `index`; a file that does not
    decode is replaced by the next one (deterministically) and counted."""
    self._reads += 1
    for attempt in range(len(self)):
      candidate = (index + attempt) % len(self)
      try:
        return self.transform(self.path(candidate),
                              rng), int(self.labels[candidate])
      except decode.DECODE_ERRORS as error:
        self._failures += 1
        logging.warning(
            "skipping %s, which does not decode (%s); %d of %d "
            "reads failed in this process", self.path(candidate), error,
            self._failures, self._reads)
        if (self._reads >= _MIN_READS_FOR_FRACTION and self._failures
            > MAX_CORRUPT_FRACTION * self._reads) or attempt >= 8:
          raise UserError(
              f"more than {MAX_CORRUPT_FRACTION:.0%} of the images read under "
              f"{self.root} do not decode (e.g. {self.path(candidate)}); fix "
              "or delete them") from None
    raise UserError(f"no image under {self.root} decodes")

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    pairs = [self.example(int(i)) for i in indices]
    return (np.stack([p[0] for p in pairs]),
            np.asarray([p[1] for p in pairs], np.int32))


def check_root(root: str) -> pathlib.Path:
  """The resolved root of an image folder: set, and a directory."""
  if not root:
    raise UserError("data.root is empty; set it to a folder holding "
                    "train/<class>/*.jpg and test/<class>/*.jpg")
  root_path = pathlib.Path(root).expanduser().resolve()
  if not root_path.exists():
    raise UserError(f"data.root {root_path} does not exist; point it at a "
                    "folder holding train/<class>/ and test/<class>/ images")
  if not root_path.is_dir():
    raise UserError(f"data.root {root_path} is not a directory; point it at a "
                    "folder holding train/<class>/ and test/<class>/ images")
  return root_path


def check_layout(
    root: str,
    splits=("train", "test")) -> tuple[pathlib.Path, tuple[str, ...]]:
  """The resolved root and its class names; one-line errors otherwise.

  `splits=("test",)` (evaluation) needs no train/: the classes are test/'s.
  """
  root_path = check_root(root)
  for split in splits:
    if not (root_path / split).is_dir():
      what = (" and ".join(f"{s}/<class>/*.jpg" for s in splits))
      raise UserError(f"{root_path / split} is missing; an image folder needs "
                      f"{what}")
  class_names = _class_folders(root_path / splits[0])
  if not class_names:
    raise UserError(f"{root_path / splits[0]} has no class subfolders; put "
                    f"the images in {splits[0]}/<class>/*.jpg")
  if tuple(splits) == ("test",):
    return root_path, class_names
  test_classes = _class_folders(root_path / "test")
  if test_classes != class_names:
    missing = sorted(set(class_names) ^ set(test_classes))
    raise UserError(f"{root_path / 'test'} and {root_path / 'train'} must hold "
                    f"the same class folders; they differ in: "
                    f"{', '.join(missing)}")
  return root_path, class_names


def _check_utf8(path: str) -> None:
  """A one-line error for a name that is not UTF-8 (it cannot be cached,
  logged or written to a run's JSON files)."""
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    raise UserError(f"{ascii(path)} has a name that is not valid UTF-8: "
                    "rename it") from None


def _class_folders(split_dir: pathlib.Path) -> tuple[str, ...]:
  names = sorted(entry.name
                 for entry in os.scandir(split_dir)
                 if entry.is_dir() and not entry.name.startswith("."))
  for name in names:
    _check_utf8(os.path.join(split_dir, name))
  return tuple(names)


def list_images(split_dir: pathlib.Path,
                class_names: Sequence[str],
                allow_empty_class: bool = True) -> tuple[list[str], np.ndarray]:
  """Image paths (sorted within each class) and their class indices.

  An empty class folder is refused where `allow_empty_class` is False (the
  training split: a head would learn a class with no examples), logged
  elsewhere; a split without images, or a broken symbolic link, is refused.
  """
  files, labels, empty = [], [], []
  for label, class_name in enumerate(class_names):
    before = len(files)
    for dirpath, dirnames, filenames in os.walk(split_dir / class_name):
      dirnames.sort()
      for filename in sorted(filenames):
        if (filename.lower().endswith(IMAGE_EXTENSIONS) and
            not filename.startswith(".")):
          path = os.path.join(dirpath, filename)
          _check_utf8(path)
          if not os.path.isfile(path):
            raise UserError(f"{path} is a broken or looping symbolic link: "
                            "fix or delete it")
          files.append(path)
          labels.append(label)
    if len(files) == before and not allow_empty_class:
      empty.append(class_name)
    elif len(files) == before:
      logging.warning(
          "class folder %s holds no %s images; its class has no "
          "examples in this split", split_dir / class_name,
          "/".join(IMAGE_EXTENSIONS))
  if not files:
    raise UserError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under "
                    f"{split_dir}/<class>/; add images or fix data.root")
  if empty:
    raise UserError(f"class folder {split_dir / empty[0]} has no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images: add images or "
                    "remove the folder")
  return files, np.asarray(labels, np.int32)


def _cache_path(root: pathlib.Path, split: str, files: Sequence[str], kind: str,
                cache_dir: pathlib.Path) -> pathlib.Path:
  """A cache file name that changes whenever a listed file does."""
  digest = hashlib.sha256(
      f"{_CACHE_VERSION}\0{root}\0{split}\0{kind}\0{len(files)}\n".encode())
  for path in files:
    stat = os.stat(path)
    digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0"
                  f"{stat.st_mtime_ns}\n".encode())
  name = f"{root.name}-{split}-{kind}-{digest.hexdigest()[:24]}.npz"
  return cache_dir / "image_folder" / name


def index_split(root: pathlib.Path, split: str, files: list[str],
                labels: np.ndarray, cache_dir: pathlib.Path):
  """(files, labels, sizes [N, 2] as (width, height)) of the files whose
  header opens, cached; skips the others with a count."""
  cache_path = _cache_path(root, split, files, "index", cache_dir)
  cached = _read_npz(cache_path, ("ok", "sizes"))
  if cached is not None and len(cached["ok"]) == len(files):
    ok, sizes = cached["ok"].astype(bool), cached["sizes"]
  else:
    start = time.perf_counter()
    sizes = np.zeros((len(files), 2), np.int64)
    ok = np.zeros(len(files), bool)
    for i, path in enumerate(files):
      size = decode.header(path)
      if size is not None:
        ok[i], sizes[i] = True, size
    logging.info("Indexed %d %s files of %s in %.1f s", len(files), split, root,
                 time.perf_counter() - start)
    _write_npz(cache_path, ok=ok, sizes=sizes)
  bad = int((~ok).sum())
  if bad > MAX_CORRUPT_FRACTION * len(files):
    example = files[int(np.flatnonzero(~ok)[0])]
    raise UserError(
        f"more than {MAX_CORRUPT_FRACTION:.0%} of the {len(files)} image files "
        f"under {root / split} are not images (e.g. {example}); fix or delete "
        "them")
  if bad:
    logging.warning(
        "Skipped %d of %d image files under %s that could not be "
        "decoded", bad, len(files), root / split)
  keep = np.flatnonzero(ok)
  return [files[i] for i in keep], labels[keep], sizes[keep]


def native_size(files: Sequence[str], sizes: np.ndarray) -> int:
  """The one square size all images share; else a one-line error."""
  first_w, first_h = sizes[0]
  if first_w != first_h:
    raise UserError(f"{files[0]} is {first_w}x{first_h}, not square; set "
                    "data.image_size to resize the images")
  other = np.flatnonzero((sizes != sizes[0]).any(axis=1))
  if len(other):
    w, h = sizes[other[0]]
    raise UserError(f"{files[other[0]]} is {w}x{h} but earlier images are "
                    f"{first_w}x{first_h}; set data.image_size to resize them")
  return int(first_w)


def decoded_split(root: pathlib.Path, split: str, files: list[str],
                  labels: np.ndarray, transform: decode.Transform,
                  cache_dir: pathlib.Path):
  """(images uint8 [N, S, S, 3], labels) of a small split, decoded once and
  cached as .npz; files that do not decode are skipped with a count."""
  cache_path = _cache_path(root, split, files, f"decoded{transform.size}",
                           cache_dir)
  cached = _read_npz(cache_path, ("images", "labels", "num_corrupt"))
  if cached is not None:
    images, labels, num_corrupt = (cached["images"], cached["labels"],
                                   int(cached["num_corrupt"]))
    logging.info("Read %d %s images of %s from the cache %s", len(labels),
                 split, root, cache_path)
  else:
    start = time.perf_counter()
    images = np.empty((len(files), transform.size, transform.size, 3), np.uint8)
    kept = np.zeros(len(files), bool)
    for i, path in enumerate(files):
      try:
        images[i] = transform(path)
        kept[i] = True
      except decode.DECODE_ERRORS:
        if (~kept[:i + 1]).sum() > MAX_CORRUPT_FRACTION * len(files):
          raise UserError(
              f"more than {MAX_CORRUPT_FRACTION:.0%} of the {len(files)} "
              f"image files under {root / split} do not decode (e.g. {path}); "
              "fix or delete them") from None
    num_corrupt = int((~kept).sum())
    if num_corrupt:
      images, labels = images[kept], labels[kept]
    logging.info("Decoded %d %s images of %s in %.1f s", len(labels), split,
                 root,
                 time.perf_counter() - start)
    _write_npz(cache_path,
               images=images,
               labels=labels,
               num_corrupt=np.int64(num_corrupt))
  if num_corrupt:
    logging.warning(
        "Skipped %d of %d image files under %s that could not be "
        "decoded", num_corrupt,
        len(labels) + num_corrupt, root / split)
  return images, labels


def _read_npz(path: pathlib.Path, keys):
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as cache:
      return {key: cache[key] for key in keys}
  except Exception as error:  # pylint: disable=broad-except
    # Any unreadable cache is only a lost shortcut: build it again.
    logging.warning("Ignoring unreadable cache %s (%s)", path, error)
    return None


def _write_npz(path: pathlib.Path, **arrays):
  """Writes the arrays atomically, so readers never see a partial file."""
  tmp_name = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent,
                                     prefix=path.stem,
                                     suffix=".tmp",
                                     delete=False) as tmp:
      tmp_name = tmp.name
      np.savez(tmp, **arrays)
    os.replace(tmp_name, path)
  except OSError as error:
    # A read-only cache costs time, not correctness.
    logging.warning("Could not write the image cache %s (%s)", path, error)
    if tmp_name and os.path.exists(tmp_name):
      os.remove(tmp_name)


def robustbench_imagenet_ids() -> list[str]:
  """RobustBench's 5,000 ImageNet validation images, as `<wnid>/<file>`, in
  its order (robustbench/helper_files/imagenet_test_image_ids.txt, MIT)."""
  path = pathlib.Path(__file__).with_name("robustbench_imagenet_ids.txt")
  return [
      line.strip() for line in path.read_text().splitlines() if line.strip()
  ]


def robustbench_files(
    split_dir: pathlib.Path,
    class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """The RobustBench subset under `split_dir` (an ImageNet val folder with
  one folder per wnid), labelled by the sorted class folders as RobustBench
  does; a missing file is a one-line error."""
  index = {name: label for label, name in enumerate(class_names)}
  files, labels = [], []
  for image_id in robustbench_imagenet_ids():
    wnid = image_id.split("/")[0]
    path = split_dir / image_id
    if wnid not in index or not path.is_file():
      raise UserError(f"data.eval_subset=robustbench needs {path} (one of "
                      "RobustBench's 5000 ImageNet validation images); point "
                      "data.root at a folder whose test/ is ImageNet's val/ "
                      "in <wnid>/ folders")
    files.append(str(path))
    labels.append(index[wnid])
  return files, np.asarray(labels, np.int32)

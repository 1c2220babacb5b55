"""Seeded, class-stratified subsets: N test images that represent the set.

An image folder lists its images class by class, so the first 100 CIFAR-10
test images are all airplanes. Every "N images of a split" (`eval.
num_examples`, `eval.epoch_num_examples`, `data.test_examples`,
`data.train_examples`) is instead `stratified_subset(labels, N, seed)`: as
many images of each class as N allows (a class with too few gives all it has
and the others share the rest), the remainder of N / classes going to
classes drawn with the seed, the images of each class drawn with the seed.
It is a pure function of (labels, N, seed): the same on every run, host and
device count; each process then reads its rows of the subset's batches
(`pipeline.eval_batches`). Labels come from the index (folders), memory
(digits) or a label-only pass over the records (tfds), never from decoding
images.
"""

import dataclasses
from typing import Any, Optional

import numpy as np


def class_quotas(counts: np.ndarray, num_examples: int,
                 seed: int) -> np.ndarray:
  """Examples to take of each class: equal shares as far as `counts` allow,
  the remainder +1 each to classes drawn with `seed`."""
  counts = np.asarray(counts, np.int64)
  quotas = np.zeros_like(counts)
  remaining = min(int(num_examples), int(counts.sum()))
  open_classes = np.flatnonzero(counts > 0)
  while remaining and len(open_classes):
    share = remaining // len(open_classes)
    if share == 0:
      break
    give = np.minimum(share, counts[open_classes] - quotas[open_classes])
    quotas[open_classes] += give
    remaining -= int(give.sum())
    open_classes = open_classes[quotas[open_classes] < counts[open_classes]]
  if remaining:
    lucky = np.random.default_rng([seed, 1]).choice(open_classes,
                                                    size=remaining,
                                                    replace=False)
    quotas[lucky] += 1
  return quotas


def stratified_subset(labels: np.ndarray,
                      num_examples: int,
                      seed: int,
                      num_classes: Optional[int] = None) -> np.ndarray:
  """Sorted indices of a seeded, class-stratified subset of `labels`.

  Args:
    labels: int labels of the whole split.
    num_examples: the subset's size (at most all of them).
    seed: fixes which classes take the remainder and which examples each
      class gives.
    num_classes: the classes to stratify over (0 .. num_classes - 1);
      default: those present in `labels`.

  Returns:
    int64 indices into `labels`, ascending. With N a multiple of the class
    count and every class big enough, each class's examples are the same
    as `data.*_examples` picked before the remainder was spread.
  """
  labels = np.asarray(labels)
  classes = (np.arange(num_classes)
             if num_classes is not None else np.unique(labels))
  members = [np.flatnonzero(labels == c) for c in classes]
  quotas = class_quotas(np.array([len(m) for m in members]), num_examples, seed)
  rng = np.random.default_rng(seed)
  chosen = [
      rng.choice(m, size=int(q), replace=False)
      for m, q in zip(members, quotas)
  ]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def describe(labels: np.ndarray,
             indices: np.ndarray,
             seed: int,
             what: str = "test images") -> str:
  """E.g. 'stratified subset of 100 of 10000 test images, 10 per class,
  seed 0' (per class '9-10' when N / classes is not whole)."""
  labels = np.asarray(labels)
  picked = labels[indices]
  counts = np.array([(picked == c).sum() for c in np.unique(labels)])
  low, high = int(counts.min()), int(counts.max())
  spread = f"{low}" if low == high else f"{low}-{high}"
  return (f"stratified subset of {len(indices)} of {len(labels)} {what}, "
          f"{spread} per class, seed {seed}")


def labels_of(source) -> np.ndarray:
  """The int labels of every example of a source, without decoding images
  (a `labels` array, or a `labels()` method that reads them)."""
  labels = source.labels
  return np.asarray(labels() if callable(labels) else labels)


@dataclasses.dataclass(frozen=True, eq=False)
class SubsetSource:
  """The examples `indices` of `parent`, as a source of their own."""

  parent: Any
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def needs_rng(self) -> bool:
    return self.parent.needs_rng

  @property
  def transform(self):  # the loader asks whether examples are decoded
    return getattr(self.parent, "transform", None)

  @property
  def labels(self) -> np.ndarray:
    return labels_of(self.parent)[self.indices]

  def example(self, index: int, rng=None) -> tuple[np.ndarray, int]:
    return self.parent.example(int(self.indices[index]), rng)

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    return self.parent.get_batch(self.indices[np.asarray(indices, np.int64)])


def first_examples(source,
                   num_examples: Optional[int],
                   seed: int,
                   stratified: bool = True) -> tuple[Any, str]:
  """(the examples an evaluation of `num_examples` reads, what they are).

  All of `source` when `num_examples` is None, 0 or at least its size; else
  the stratified subset, or, when not `stratified` (RobustBench's fixed
  lists), the first `num_examples`.
  """
  total = len(source)
  if not num_examples or num_examples >= total:
    return source, f"all {total} test images"
  if not stratified:
    return (SubsetSource(source, np.arange(num_examples)),
            f"the first {num_examples} of {total} test images (the "
            "protocol's fixed order)")
  labels = labels_of(source)
  indices = stratified_subset(labels, num_examples, seed)
  return SubsetSource(source, indices), describe(labels, indices, seed)

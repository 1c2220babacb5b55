"""Deterministic, resumable batches over a `Source`, loaded by grain.

A training batch is a pure function of (seed, global step): step s reads
slice s % S of epoch s // S's permutation, S = steps_per_epoch, and example
g of the global stream draws its random transform from (seed, g). Resuming
at step k therefore needs nothing but k, and every process of a multi-host
run reads only its own contiguous rows of each global batch (process p of
P: rows [p B / P, (p + 1) B / P)), whatever the number of processes.

With extra data (`Extra`: E of the B rows of every global batch from a
second source), the main set's slices are B - E rows wide and the extra
rows of step s are positions [s E, (s + 1) E) of an endless stream of
seeded permutations of the extra set, so they too are a function of
(seed, s). Each global batch is G = gcd(B - E, E) equal chunks of
(B - E) / G main rows then E / G extra rows; a process reads whole chunks,
so P processes read disjoint rows (P must divide E as well as B) and the
global batch is the same for any P.

grain does the rest: a `MapDataset` of stream positions, mapped to decoded
examples and batched, read by `workers` processes (each decodes whole
batches; their outputs interleave in order) with a bounded prefetch. With
`workers=0` batches are read in a background thread of this process.
Evaluation batches are read the same way, in order, padded to a fixed size.
"""

import dataclasses
import math
import os
import threading
import time
from typing import Any, Iterator, Optional

from absl import flags
from absl import logging
import grain
import numpy as np

from vitat_jax.errors import UserError

# Most worker processes a host gets by default (beyond, decoding is rarely
# the bottleneck and each worker holds a copy of the file index).
MAX_DEFAULT_WORKERS = 32


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full batches per epoch; the remainder of each epoch is dropped."""
  if global_batch_size <= 0:
    raise UserError(f"the batch size must be positive, got {global_batch_size}")
  steps = num_examples // global_batch_size
  if steps == 0:
    raise UserError(f"{num_examples} training examples do not fill one batch "
                    f"of {global_batch_size}; lower the batch size or use more "
                    "training examples")
  return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch, a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_rng(seed: int, position: int) -> np.random.Generator:
  """The random numbers of the transform of stream position `position`."""
  return np.random.default_rng([seed, position, 1])


def extra_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the extra set's `epoch`-th pass, a function of (seed,
  epoch) only (and unlike any of the main set's)."""
  return np.random.default_rng([seed, epoch, 2]).permutation(num_examples)


def extra_example_rng(seed: int, position: int) -> np.random.Generator:
  """The random numbers of the transform of extra stream position
  `position`."""
  return np.random.default_rng([seed, position, 3])


@dataclasses.dataclass(frozen=True)
class Extra:
  """A second training source that fills `rows` rows of every global batch
  (`data.extra`; `data.extra_rows` gives `rows` for a config)."""

  source: Any
  rows: int


def default_workers(source) -> int:
  """Worker processes when `data.workers` is unset: none for a split held in
  memory as final images (nothing to decode), else one per CPU this process
  may use beyond the one that drives the accelerators."""
  if not _decodes(source):
    return 0
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
  return max(1, min(cpus - 1, MAX_DEFAULT_WORKERS))


def resolve_workers(workers: Optional[int], source) -> int:
  """`workers` (config.data.workers), or the default for `source` if None."""
  if workers is None:
    workers = default_workers(source)
    logging.info("data.workers unset: %d loader worker process(es) for %s",
                 workers,
                 type(source).__name__)
  if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) \
      or workers < 0:
    raise UserError(f"data.workers={workers!r}: use 0 (decode in the training "
                    "process), a positive number of worker processes, or "
                    "leave it unset for one per spare CPU")
  return int(workers)


def _decodes(source) -> bool:
  return getattr(source, "transform", None) is not None


class _TrainExample:
  """Local stream position -> (image, label) of this process's rows."""

  def __init__(self, source, global_batch_size: int, per_process: int,
               offset: int, num_steps: int, seed: int):
    self.source = source
    self.global_batch_size = global_batch_size
    self.per_process = per_process
    self.offset = offset
    self.num_steps = num_steps
    self.seed = seed
    self._epoch, self._permutation = None, None

  def __call__(self, local_position: int):
    step, row = divmod(int(local_position), self.per_process)
    epoch, index_in_epoch = divmod(step, self.num_steps)
    if epoch != self._epoch:
      self._epoch = epoch
      self._permutation = epoch_permutation(len(self.source), self.seed, epoch)
    position = index_in_epoch * self.global_batch_size + self.offset + row
    global_position = (epoch * self.num_steps * self.global_batch_size +
                       position)
    rng = (example_rng(self.seed, global_position)
           if self.source.needs_rng else None)
    image, label = self.source.example(int(self._permutation[position]), rng)
    return image, np.int32(label)

  def __getstate__(self):  # workers rebuild the permutation they need
    return {**self.__dict__, "_epoch": None, "_permutation": None}


class _TrainBatch(_TrainExample):
  """Step -> this process's rows, read at once: for sources held in memory
  as final images, where per-example reads would cost more than the copy."""

  def __call__(self, step: int):
    epoch, index_in_epoch = divmod(int(step), self.num_steps)
    if epoch != self._epoch:
      self._epoch = epoch
      self._permutation = epoch_permutation(len(self.source), self.seed, epoch)
    start = index_in_epoch * self.global_batch_size + self.offset
    return self.source.get_batch(self._permutation[start:start +
                                                   self.per_process])


class _MixedExample:
  """Local stream position -> (image, label) of this process's rows of a
  batch mixed from the main and the extra source (module docstring)."""

  def __init__(self, source, extra: Extra, global_batch_size: int,
               process_index: int, process_count: int, num_steps: int,
               seed: int):
    self.source, self.extra_source = source, extra.source
    self.main_rows, self.extra_rows = global_batch_size - extra.rows, extra.rows
    chunks = math.gcd(self.main_rows, self.extra_rows)
    self.chunk_main = self.main_rows // chunks
    self.chunk_extra = self.extra_rows // chunks
    self.chunks = chunks // process_count  # this process's
    self.first_chunk = process_index * self.chunks
    self.per_process = global_batch_size // process_count
    self.num_steps = num_steps
    self.seed = seed
    self._epoch, self._permutation, self._extra_permutations = None, None, {}

  def _main_indices(self, step: int, slots) -> np.ndarray:
    epoch, index_in_epoch = divmod(step, self.num_steps)
    if epoch != self._epoch:
      self._epoch = epoch
      self._permutation = epoch_permutation(len(self.source), self.seed, epoch)
    return self._permutation[index_in_epoch * self.main_rows + slots]

  def _extra_indices(self, positions: np.ndarray) -> np.ndarray:
    """Extra stream positions -> extra set indices."""
    size = len(self.extra_source)
    epochs, offsets = np.divmod(positions, size)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      epoch = int(epoch)
      if epoch not in self._extra_permutations:
        if len(self._extra_permutations) >= 2:  # keep the newest
          del self._extra_permutations[min(self._extra_permutations)]
        self._extra_permutations[epoch] = extra_permutation(
            size, self.seed, epoch)
      here = epochs == epoch
      indices[here] = self._extra_permutations[epoch][offsets[here]]
    return indices

  def __call__(self, local_position: int):
    step, row = divmod(int(local_position), self.per_process)
    chunk, within = divmod(row, self.chunk_main + self.chunk_extra)
    chunk += self.first_chunk
    if within < self.chunk_main:
      slot = chunk * self.chunk_main + within
      index = int(self._main_indices(step, slot))
      rng = (example_rng(self.seed, step * self.main_rows +
                         slot) if self.source.needs_rng else None)
      image, label = self.source.example(index, rng)
    else:
      position = step * self.extra_rows + chunk * self.chunk_extra + (
          within - self.chunk_main)
      index = int(self._extra_indices(np.asarray([position]))[0])
      rng = (extra_example_rng(self.seed, position)
             if self.extra_source.needs_rng else None)
      image, label = self.extra_source.example(index, rng)
    return image, np.int32(label)

  def __getstate__(self):  # workers rebuild the permutations they need
    return {
        **self.__dict__, "_epoch": None,
        "_permutation": None,
        "_extra_permutations": {}
    }


class _MixedBatch(_MixedExample):
  """Step -> this process's rows of a mixed batch, read at once (sources
  held in memory as final images)."""

  def __call__(self, step: int):
    step = int(step)
    main_slots = np.arange(self.first_chunk * self.chunk_main,
                           (self.first_chunk + self.chunks) * self.chunk_main)
    extra_positions = step * self.extra_rows + np.arange(
        self.first_chunk * self.chunk_extra,
        (self.first_chunk + self.chunks) * self.chunk_extra)
    main = self.source.get_batch(self._main_indices(step, main_slots))
    extra = self.extra_source.get_batch(self._extra_indices(extra_positions))
    # Chunk by chunk: its main rows, then its extra rows.
    return tuple(
        np.concatenate([
            m.reshape(self.chunks, self.chunk_main, *m.shape[1:]),
            x.reshape(self.chunks, self.chunk_extra, *x.shape[1:])
        ],
                       axis=1).reshape(self.per_process, *m.shape[1:])
        for m, x in zip(main, extra))


class _EvalExample:
  """Local position -> (image, label, valid) of this process's eval rows."""

  def __init__(self, source, batch_size: int, per_process: int, offset: int,
               total: int):
    self.source = source
    self.batch_size = batch_size
    self.per_process = per_process
    self.offset = offset
    self.total = total

  def __call__(self, local_position: int):
    batch, row = divmod(int(local_position), self.per_process)
    position = batch * self.batch_size + self.offset + row
    # Padding repeats the last real example, so it stays numerically harmless.
    image, label = self.source.example(min(position, self.total - 1))
    return image, np.int32(label), np.bool_(position < self.total)


class _ExitWithParent:
  """A worker's init function: exit when the training process is gone (it
  may be SIGKILLed, which runs no cleanup), so no worker outlives it."""

  def __init__(self):
    self.parent = os.getpid()

  def __call__(self, worker_index: int, worker_count: int):
    del worker_index, worker_count

    def watch():
      while os.getppid() == self.parent:
        time.sleep(0.2)
      os._exit(0)  # pylint: disable=protected-access

    threading.Thread(target=watch, name="vitat_jax-parent-watch",
                     daemon=True).start()


def _loader(examples: grain.MapDataset, batch_size: Optional[int], workers: int,
            prefetch: int) -> Iterator:
  """Batches of `examples` (already batches if batch_size is None), read by
  grain with `workers` processes."""
  batches = examples
  if batch_size is not None:
    batches = examples.batch(batch_size, drop_remainder=True)
  # One reading thread per worker (parallelism comes from the processes) and
  # a bounded buffer, so memory does not grow with the data.
  dataset = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 1)))
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; outside an absl
      # app (tests, notebooks) they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)),
                                  worker_init_fn=_ExitWithParent())
  return _closing(iter(dataset))


# grain's error when a worker process dies (SIGKILL, the OOM killer).
WORKER_DIED = "Worker process was terminated unexpectedly"


def _closing(iterator) -> Iterator:
  """`iterator` as a generator whose close() (or collection) stops grain's
  threads and worker processes."""
  try:
    for batch in iterator:
      yield tuple(np.asarray(a) for a in batch)
  except RuntimeError as e:
    if WORKER_DIED not in str(e):
      raise
    # grain's traceback says nothing a user can act on; the run's last
    # checkpoint is intact and the rerun resumes from it.
    first = str(e).split(". ")[0]
    raise UserError(f"a data loader worker process stopped ({first}; killed, "
                    "or out of memory?): rerun the same command to resume "
                    "from the last checkpoint, with a lower data.workers if "
                    "memory is short") from None
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def train_batches(
    source,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2,
    extra: Optional[Extra] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's share of the global batches of steps start_step, ....

  Args:
    source: the training split.
    global_batch_size: examples per step over all processes.
    seed: the data seed (>= 0); fixes every epoch's order and transforms.
    start_step: the first global step to yield (to resume a run).
    process_index: this process's index in [0, process_count).
    process_count: processes sharing each global batch.
    workers: decoding processes (0: a background thread of this process).
    prefetch: batches read ahead (per worker).
    extra: `extra.rows` of each global batch from `extra.source` (module
      docstring); an epoch is then len(source) // (B - extra.rows) steps.

  Returns:
    An endless iterator of (uint8 images [B/P, H, W, 3], int32 labels [B/P])
    with a close(). Checks run now, before anything is read.
  """
  extra_rows = 0 if extra is None else extra.rows
  if extra is not None and not 0 < extra_rows < global_batch_size:
    raise UserError(f"{extra_rows} extra rows of each batch of "
                    f"{global_batch_size} leave none to one of the sets; "
                    "change data.extra_fraction to take rows from both")
  num_steps = steps_per_epoch(len(source), global_batch_size - extra_rows)
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} must be in [0, "
                    f"{process_count}) with process_count >= 1")
  if global_batch_size % process_count:
    raise UserError(f"the global batch size {global_batch_size} must be "
                    f"divisible by the {process_count} processes; change the "
                    "batch size")
  if seed < 0 or start_step < 0:
    raise UserError(f"the data seed ({seed}) and start step ({start_step}) "
                    "must be >= 0")
  if extra is not None:
    return _mixed_batches(source, extra, global_batch_size, seed, start_step,
                          process_index, process_count, workers, prefetch,
                          num_steps)
  workers = resolve_workers(workers, source)
  per_process = global_batch_size // process_count
  args = (source, global_batch_size, per_process, process_index * per_process,
          num_steps, seed)
  if not _decodes(source) and not source.needs_rng:
    steps = grain.MapDataset.range(start_step, 2**62)
    return _loader(steps.map(_TrainBatch(*args)), None, workers, prefetch)
  read = _TrainExample(*args)
  # Endless in practice: 2**62 examples.
  positions = grain.MapDataset.range(start_step * per_process, 2**62)
  return _loader(positions.map(read), per_process, workers, prefetch)


def _mixed_batches(source, extra: Extra, global_batch_size: int, seed: int,
                   start_step: int, process_index: int, process_count: int,
                   workers: int, prefetch: int, num_steps: int) -> Iterator:
  """`train_batches` with `extra` (its arguments checked but extra's)."""
  if extra.rows % process_count:
    raise UserError(f"{extra.rows} extra rows of each batch must be "
                    f"divisible by the {process_count} processes; change "
                    "data.extra_fraction")
  if not len(extra.source):
    raise UserError("the extra training set is empty")
  sources = (source, extra.source)
  # Default workers if either source decodes; none if both are in memory.
  workers = resolve_workers(workers,
                            source if _decodes(source) else extra.source)
  args = (source, extra, global_batch_size, process_index, process_count,
          num_steps, seed)
  if not any(_decodes(s) or s.needs_rng for s in sources):
    steps = grain.MapDataset.range(start_step, 2**62)
    return _loader(steps.map(_MixedBatch(*args)), None, workers, prefetch)
  per_process = global_batch_size // process_count
  positions = grain.MapDataset.range(start_step * per_process, 2**62)
  return _loader(positions.map(_MixedExample(*args)), per_process, workers,
                 prefetch)


def eval_batches(
    source,
    batch_size: int,
    num_examples: Optional[int] = None,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The first `num_examples` examples in order, in batches of a fixed shape.

  Args:
    source: the evaluation split.
    batch_size: examples per (global) batch; the last batch is padded to it.
    num_examples: how many examples to visit (all if None; at most all).
    process_index: this process's index; it reads rows [p B / P, (p + 1) B /
      P) of each batch.
    process_count: processes sharing each batch.
    workers: decoding processes (0: a background thread of this process).
    prefetch: batches read ahead (per worker).

  Returns:
    An iterator of this process's (images, labels, valid) [B / P]: `valid`
    is False on padding, which repeats the last real example.
  """
  if batch_size <= 0:
    raise UserError(f"the eval batch size must be positive, got {batch_size}")
  total = len(source) if num_examples is None else min(num_examples,
                                                       len(source))
  if total < 0:
    raise UserError(f"the number of eval examples must be >= 0, got "
                    f"{num_examples}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} must be in [0, "
                    f"{process_count}) with process_count >= 1")
  if batch_size % process_count:
    raise UserError(f"the eval batch size {batch_size} must be divisible by "
                    f"the {process_count} processes; change eval.batch_size")
  workers = resolve_workers(workers, source)
  if total == 0:
    return iter(())
  per_process = batch_size // process_count
  num_batches = -(-total // batch_size)
  read = _EvalExample(source, batch_size, per_process,
                      process_index * per_process, total)
  positions = grain.MapDataset.range(0, num_batches * per_process)
  # No more workers than batches: each would start only to find nothing.
  return _loader(positions.map(read), per_process, min(workers, num_batches),
                 prefetch)

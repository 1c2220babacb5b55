"""Deterministic, resumable batch iteration over a `Source`.

A training batch is a pure function of (seed, global step): step s reads
slice s % S of epoch s // S's permutation, S = steps_per_epoch. Resuming at
step k therefore needs nothing but k, and every process of a multi-host run
derives the same global batch and keeps its own contiguous slice of it.
"""

import queue
import threading
from typing import Iterator, Optional

import numpy as np

from vitat_jax.data.sources import Source
from vitat_jax.errors import UserError


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


def train_batches(source: Source, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's share of the global batches of steps start_step, ....

  Args:
    source: the training split.
    global_batch_size: examples per step over all processes.
    seed: the data seed (>= 0); fixes every epoch's order.
    start_step: the first global step to yield (to resume a run).
    process_index: this process's index in [0, process_count).
    process_count: processes sharing each global batch.
    prefetch: batches read ahead by a background thread; 0 reads inline.

  Returns:
    An endless iterator of (uint8 images [B/P, H, W, 3], int32 labels [B/P]).
    Checks run now, before anything is read.
  """
  num_steps = steps_per_epoch(len(source), global_batch_size)
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
  per_process = global_batch_size // process_count
  offset = process_index * per_process

  def batches():
    epoch, permutation = None, None
    step = start_step
    while True:
      step_epoch, index_in_epoch = divmod(step, num_steps)
      if step_epoch != epoch:
        epoch = step_epoch
        permutation = epoch_permutation(len(source), seed, epoch)
      start = index_in_epoch * global_batch_size + offset
      yield source.get_batch(permutation[start:start + per_process])
      step += 1

  return _prefetched(batches(), prefetch)


def eval_batches(
    source: Source, batch_size: int, num_examples: Optional[int] = None,
    prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The first `num_examples` examples in order, in batches of a fixed shape.

  Args:
    source: the evaluation split.
    batch_size: examples per batch; the last batch is padded to it.
    num_examples: how many examples to visit (all if None; at most all).
    prefetch: batches read ahead by a background thread; 0 reads inline.

  Returns:
    An iterator of (images, labels, valid): `valid` [B] is False on padding,
    which repeats the last real example.
  """
  if batch_size <= 0:
    raise UserError(f"the eval batch size must be positive, got {batch_size}")
  total = len(source) if num_examples is None else min(num_examples,
                                                        len(source))
  if total < 0:
    raise UserError(f"the number of eval examples must be >= 0, got "
                    f"{num_examples}")

  def batches():
    for start in range(0, total, batch_size):
      count = min(batch_size, total - start)
      images, labels = source.get_batch(np.arange(start, start + count))
      valid = np.arange(batch_size) < count
      if count < batch_size:
        # Repeats are real images, so padded rows stay numerically harmless.
        pad = np.full(batch_size - count, count - 1)
        images = np.concatenate([images, images[pad]])
        labels = np.concatenate([labels, labels[pad]])
      yield images, labels, valid

  return _prefetched(batches(), prefetch)


_END = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


def _prefetched(items: Iterator, size: int) -> Iterator:
  """`items`, produced up to `size` ahead by a daemon thread.

  The thread starts with the first `next()` and stops when the iterator is
  exhausted, closed or garbage-collected; its errors reappear in the caller.
  """
  if size <= 0:
    return items

  def run():
    buffer = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
      # A bounded wait, so a consumer that has gone away cannot hang us.
      while not stop.is_set():
        try:
          buffer.put(item, timeout=0.05)
          return True
        except queue.Full:
          pass
      return False

    def produce():
      try:
        for item in items:
          if not put(item):
            return
        put(_END)
      except BaseException as error:  # pylint: disable=broad-except
        put(_Failure(error))

    thread = threading.Thread(target=produce, name="vitat_jax-prefetch",
                              daemon=True)
    thread.start()
    try:
      while True:
        item = buffer.get()
        if item is _END:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      stop.set()
      # A batch in flight finishes on its own; the thread then sees `stop`.
      thread.join(timeout=2)

  return run()

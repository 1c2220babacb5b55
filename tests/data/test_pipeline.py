"""Batch iteration: determinism, exact resume, sharding, eval padding."""

import gc
import itertools
import threading

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from vitat_jax import data
from vitat_jax.errors import UserError


def _indexed_source(num_examples: int) -> data.ArraySource:
  """Example i has label i and pixels i % 256, so batches name their rows."""
  ids = np.arange(num_examples)
  images = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None],
                           (num_examples, 2, 2, 3)).copy()
  return data.ArraySource(images, ids.astype(np.int32))


def _labels(batches, count):
  return [labels for _, labels in itertools.islice(batches, count)]


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "vitat_jax-prefetch"]


def test_steps_per_epoch_drops_the_remainder():
  assert data.steps_per_epoch(100, 32) == 3
  assert data.steps_per_epoch(96, 32) == 3


@pytest.mark.parametrize("num_examples, batch_size", [(10, 32), (10, 0)])
def test_steps_per_epoch_errors(num_examples, batch_size):
  with pytest.raises(UserError) as excinfo:
    data.steps_per_epoch(num_examples, batch_size)
  assert "\n" not in str(excinfo.value)


def test_epoch_permutation_is_a_seeded_permutation():
  first = data.epoch_permutation(50, seed=1, epoch=2)
  np.testing.assert_array_equal(np.sort(first), np.arange(50))
  np.testing.assert_array_equal(first, data.epoch_permutation(50, 1, 2))
  np.testing.assert_array_equal(
      first, np.random.default_rng([1, 2]).permutation(50))
  assert not np.array_equal(first, data.epoch_permutation(50, 1, 3))
  assert not np.array_equal(first, data.epoch_permutation(50, 2, 2))


def test_train_batches_follow_the_epoch_permutations():
  source = _indexed_source(23)
  batches = data.train_batches(source, 5, seed=7, prefetch=0)
  for step, (images, labels) in enumerate(itertools.islice(batches, 10)):
    epoch, index = divmod(step, 4)
    expected = data.epoch_permutation(23, 7, epoch)[5 * index:5 * index + 5]
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(images[:, 0, 0, 0], expected % 256)
    assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_train_batches_are_deterministic_and_seeded():
  source = _indexed_source(40)
  first = _labels(data.train_batches(source, 8, seed=0), 12)
  second = _labels(data.train_batches(source, 8, seed=0), 12)
  other = _labels(data.train_batches(source, 8, seed=1), 12)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


def test_each_epoch_visits_every_example_at_most_once():
  source = _indexed_source(103)
  labels = _labels(data.train_batches(source, 10, seed=3), 20)
  for epoch in (labels[:10], labels[10:]):
    seen = np.concatenate(epoch)
    assert len(np.unique(seen)) == 100  # 3 dropped by the remainder
    assert seen.min() >= 0 and seen.max() < 103
  assert not np.array_equal(labels[:10], labels[10:])


@settings(max_examples=15, deadline=None)
@given(start_step=st.integers(0, 30), num_examples=st.integers(6, 30),
       batch_size=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_resume_equals_the_tail_of_an_uninterrupted_run(
    start_step, num_examples, batch_size, seed):
  source = _indexed_source(num_examples)
  full = _labels(data.train_batches(source, batch_size, seed, prefetch=0),
                 start_step + 5)
  resumed = _labels(data.train_batches(source, batch_size, seed,
                                       start_step=start_step, prefetch=0), 5)
  np.testing.assert_array_equal(full[start_step:], resumed)


def test_resume_across_an_epoch_boundary_with_prefetch():
  source = _indexed_source(20)  # 3 steps per epoch of 6
  full = _labels(data.train_batches(source, 6, seed=5), 12)
  resumed = _labels(data.train_batches(source, 6, seed=5, start_step=2), 10)
  np.testing.assert_array_equal(full[2:], resumed)


def test_process_slices_concatenate_to_the_global_batch():
  source = _indexed_source(50)
  global_batches = _labels(data.train_batches(source, 8, seed=2), 9)
  per_process = [
      _labels(data.train_batches(source, 8, seed=2, process_index=p,
                                 process_count=4), 9) for p in range(4)]
  for step in range(9):
    assert all(len(labels[step]) == 2 for labels in per_process)
    np.testing.assert_array_equal(
        np.concatenate([labels[step] for labels in per_process]),
        global_batches[step])


@pytest.mark.parametrize("kwargs", [
    dict(global_batch_size=10, process_count=4),
    dict(global_batch_size=8, process_count=4, process_index=4),
    dict(global_batch_size=64),  # more than the 50 examples
    dict(global_batch_size=8, seed=-1),
])
def test_train_batches_check_arguments_before_reading(kwargs):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(UserError) as excinfo:
    data.train_batches(_indexed_source(50), **kwargs)  # no next() needed
  assert "\n" not in str(excinfo.value)


def test_prefetch_thread_stops_when_the_iterator_is_closed():
  before = len(_prefetch_threads())
  batches = data.train_batches(_indexed_source(30), 4, seed=0, prefetch=2)
  next(batches)
  assert len(_prefetch_threads()) == before + 1
  batches.close()
  assert len(_prefetch_threads()) == before

  abandoned = data.train_batches(_indexed_source(30), 4, seed=0, prefetch=2)
  next(abandoned)
  del abandoned
  gc.collect()
  assert len(_prefetch_threads()) == before


def test_prefetch_passes_on_source_errors():

  class FailingSource:

    def __len__(self):
      return 20

    def get_batch(self, indices):
      raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):
    next(data.train_batches(FailingSource(), 4, seed=0, prefetch=2))


def test_eval_batches_pad_the_last_batch_and_mark_it():
  source = _indexed_source(23)
  batches = list(data.eval_batches(source, 10))
  assert [valid.sum() for _, _, valid in batches] == [10, 10, 3]
  for images, labels, valid in batches:
    assert images.shape == (10, 2, 2, 3) and labels.shape == (10,)
    assert valid.dtype == bool
  np.testing.assert_array_equal(
      np.concatenate([labels[valid] for _, labels, valid in batches]),
      np.arange(23))
  images, labels, valid = batches[-1]
  np.testing.assert_array_equal(valid, np.arange(10) < 3)
  np.testing.assert_array_equal(labels[3:], 22)  # the last example repeated
  np.testing.assert_array_equal(images[3:], images[[2] * 7])


def test_eval_batches_take_the_first_examples():
  source = _indexed_source(23)
  batches = list(data.eval_batches(source, 10, num_examples=15, prefetch=0))
  assert len(batches) == 2
  np.testing.assert_array_equal(
      np.concatenate([labels[valid] for _, labels, valid in batches]),
      np.arange(15))
  assert not list(data.eval_batches(source, 10, num_examples=0))
  assert sum(v.sum() for *_, v in data.eval_batches(source, 10, 99)) == 23
  with pytest.raises(UserError):
    data.eval_batches(source, 0)

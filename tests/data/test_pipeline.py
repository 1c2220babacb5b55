"""Batch iteration (grain): determinism, exact resume, per-process rows,
workers and their shutdown, eval padding."""

import itertools
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

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
  np.testing.assert_array_equal(first,
                                np.random.default_rng([1, 2]).permutation(50))
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
@given(start_step=st.integers(0, 30),
       num_examples=st.integers(6, 30),
       batch_size=st.integers(1, 6),
       seed=st.integers(0, 2**31))
def test_resume_equals_the_tail_of_an_uninterrupted_run(start_step,
                                                        num_examples,
                                                        batch_size, seed):
  source = _indexed_source(num_examples)
  full = _labels(data.train_batches(source, batch_size, seed, prefetch=0),
                 start_step + 5)
  resumed = _labels(
      data.train_batches(source,
                         batch_size,
                         seed,
                         start_step=start_step,
                         prefetch=0), 5)
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
      _labels(
          data.train_batches(source,
                             8,
                             seed=2,
                             process_index=p,
                             process_count=4), 9) for p in range(4)
  ]
  for step in range(9):
    assert all(len(labels[step]) == 2 for labels in per_process)
    np.testing.assert_array_equal(
        np.concatenate([labels[step] for labels in per_process]),
        global_batches[step])


@pytest.mark.parametrize(
    "kwargs",
    [
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


class _NoisySource:
  """Example i: pixels i % 256 plus a random offset drawn from `rng`, so a
  batch shows both its rows and its transform's random numbers."""

  needs_rng = True

  def __init__(self, num_examples, fail_at=None):
    self.num_examples = num_examples
    self.fail_at = fail_at

  def __len__(self):
    return self.num_examples

  def example(self, index, rng=None):
    if index == self.fail_at:
      raise RuntimeError("disk on fire")
    noise = int(rng.integers(0, 1000))
    image = np.full((2, 2, 3), (index + noise) % 256, np.uint8)
    return image, index


def _all_batches(batches, count):
  out = list(itertools.islice(batches, count))
  batches.close()
  return out


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def _children():
  return {p.pid for p in multiprocessing.active_children()}


def test_workers_give_the_same_batches_resume_exactly_and_stop_on_close():
  # Worker processes take seconds to start (each imports grain and JAX), so
  # this test shares them between its checks.
  source = _NoisySource(37)  # 4 steps per epoch of 8
  inline = _all_batches(data.train_batches(source, 8, seed=3, workers=0), 10)
  before = _children()
  batches = data.train_batches(source, 8, seed=3, workers=2)
  workers = list(itertools.islice(batches, 10))
  assert len(_children() - before) == 2
  batches.close()
  deadline = time.time() + 10
  while _children() - before and time.time() < deadline:
    time.sleep(0.1)
  assert not _children() - before, "workers left behind after close()"
  _assert_same_batches(workers, inline)
  resumed = _all_batches(
      data.train_batches(source, 8, seed=3, start_step=6, workers=1), 4)
  _assert_same_batches(resumed, inline[6:])
  other_seed = _all_batches(data.train_batches(source, 8, seed=4), 1)
  assert not np.array_equal(other_seed[0][0], inline[0][0])


def test_processes_read_disjoint_rows_whose_union_is_the_global_batch():
  source = _NoisySource(50)
  whole = _all_batches(data.train_batches(source, 8, seed=2), 7)
  parts = [
      _all_batches(
          data.train_batches(source,
                             8,
                             seed=2,
                             process_index=p,
                             process_count=2), 7) for p in range(2)
  ]
  for step in range(7):
    first, second = parts[0][step][1], parts[1][step][1]
    assert not set(first) & set(second)
    for i in range(2):  # images (with their random numbers) and labels
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][i], parts[1][step][i]]),
          whole[step][i])


def test_eval_rows_of_two_processes_are_disjoint_and_cover_the_batch():
  source = _indexed_source(23)
  whole = list(data.eval_batches(source, 10))
  parts = [
      list(
          data.eval_batches(source,
                            10,
                            process_index=p,
                            process_count=2,
                            workers=w)) for p, w in ((0, 0), (1, 1))
  ]
  assert [len(p) for p in parts] == [3, 3]
  seen = []
  for batch, (first, second) in enumerate(zip(*parts)):
    for i in range(3):  # images, labels, valid
      np.testing.assert_array_equal(np.concatenate([first[i], second[i]]),
                                    whole[batch][i])
    seen += list(first[1][first[2]]) + list(second[1][second[2]])
  assert sorted(seen) == list(range(23))
  with pytest.raises(UserError, match="divisible"):
    data.eval_batches(source, 10, process_count=3)


def test_worker_errors_reach_the_caller():
  with pytest.raises(Exception, match="disk on fire"):
    batches = data.train_batches(_NoisySource(20, fail_at=0),
                                 20,
                                 seed=0,
                                 workers=1)
    try:
      next(batches)
    finally:
      batches.close()


def test_a_killed_worker_is_one_line_not_grains_traceback():
  # (issue 26 item 8) SIGKILL, as the OOM killer sends it.
  before = _children()
  batches = data.train_batches(_NoisySource(30), 4, seed=0, workers=1)
  try:
    next(batches)
    (worker,) = _children() - before
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(UserError,
                       match="a data loader worker process stopped") as info:
      for _ in range(1000):
        next(batches)
    assert "\n" not in str(info.value)
    assert "rerun the same command" in str(info.value)
  finally:
    batches.close()


_KILLED_PARENT = """
import sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from tests.data.test_pipeline import _NoisySource
from vitat_jax import data
import multiprocessing
batches = data.train_batches(_NoisySource(30), 4, seed=0, workers=1)
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()),
      flush=True)
time.sleep(600)
"""


def test_workers_exit_when_the_training_process_is_killed():
  repo = str(pathlib.Path(__file__).resolve().parents[2])
  proc = subprocess.Popen(
      [sys.executable, "-c",
       _KILLED_PARENT.format(repo=repo)],
      stdout=subprocess.PIPE,
      text=True)
  try:
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 1
  finally:
    proc.kill()
    proc.wait()
  deadline = time.time() + 15
  alive = pids
  while alive and time.time() < deadline:
    time.sleep(0.2)
    alive = [p for p in pids if _alive(p)]
  assert not alive, f"workers {alive} outlived their SIGKILLed parent"


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie is dead but not yet reaped by its (new) parent.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_bad_worker_counts_are_one_line_errors(workers):
  with pytest.raises(UserError) as excinfo:
    data.train_batches(_indexed_source(30), 4, seed=0, workers=workers)
  assert "data.workers" in str(excinfo.value)
  assert "\n" not in str(excinfo.value)


def test_default_workers_follow_the_source():
  from vitat_jax.data import pipeline
  assert pipeline.resolve_workers(None, _indexed_source(4)) == 0
  folder_like = types.SimpleNamespace(transform=data.Transform("squash", 8))
  assert pipeline.resolve_workers(None, folder_like) >= 1
  assert pipeline.resolve_workers(3, folder_like) == 3


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

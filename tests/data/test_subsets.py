"""N test images are a seeded, class-stratified subset, whoever reads it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from vitat_jax import data
from vitat_jax import evaluation
from vitat_jax.data import pipeline
from vitat_jax.data import subsets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_equal_counts_the_remainder_spread_and_short_classes_filled():
  labels = np.repeat(np.arange(10), 100)  # in class order, like a folder
  subset = subsets.stratified_subset(labels, 100, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [10] * 10)
  assert np.all(np.diff(subset) > 0)
  # 105: five classes drawn with the seed take one more.
  counts = np.bincount(labels[subsets.stratified_subset(labels, 105, 0)])
  assert sorted(counts) == [10] * 5 + [11] * 5
  other = np.bincount(labels[subsets.stratified_subset(labels, 105, 1)])
  assert not np.array_equal(counts, other)
  # Fewer than the classes: one each of N classes.
  assert sorted(
      np.bincount(labels[subsets.stratified_subset(labels, 4, 0)],
                  minlength=10)) == [0] * 6 + [1] * 4
  # A class with 3 examples gives them all; the others share the rest.
  short = np.concatenate([np.zeros(3, int), np.repeat(np.arange(1, 4), 50)])
  counts = np.bincount(short[subsets.stratified_subset(short, 30, 0)])
  assert counts[0] == 3 and sorted(counts[1:]) == [9, 9, 9]
  # All of it when N is the whole split or more.
  np.testing.assert_array_equal(subsets.stratified_subset(short, 999, 0),
                                np.arange(len(short)))


def test_the_subset_is_a_pure_function_of_labels_n_and_seed():
  labels = np.random.default_rng(5).integers(0, 7, size=1000)
  first = subsets.stratified_subset(labels, 123, seed=2)
  np.testing.assert_array_equal(first,
                                subsets.stratified_subset(labels, 123, 2))
  assert not np.array_equal(first, subsets.stratified_subset(labels, 123, 3))
  assert (subsets.describe(
      labels, first,
      2) == "stratified subset of 123 of 1000 test images, 17-18 per class, "
          "seed 2")


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_each_process_reads_its_rows_of_the_same_subset(process_count):
  labels = np.repeat(np.arange(10), 20).astype(np.int32)
  # Each image holds its own index, to see which one a process read.
  images = np.broadcast_to(
      np.arange(200, dtype=np.uint8)[:, None, None, None],
      (200, 2, 2, 3)).copy()
  source = data.ArraySource(images, labels)
  subset, _ = subsets.first_examples(source, 50, seed=0)
  rows = [[] for _ in range(4)]  # 50 images in 4 batches of 16
  for process in range(process_count):
    batches = pipeline.eval_batches(subset,
                                    16,
                                    process_index=process,
                                    process_count=process_count)
    for index, (batch_images, batch_labels, valid) in enumerate(batches):
      rows[index] += [(int(i), int(l), bool(v))
                      for i, l, v in zip(batch_images[:, 0, 0,
                                                      0], batch_labels, valid)]
  read = [row for batch in rows for row in batch if row[2]]
  np.testing.assert_array_equal([r[0] for r in read], subset.indices)
  np.testing.assert_array_equal([r[1] for r in read], labels[subset.indices])


def _cifar10_config(root, **eval_fields):
  config = default.get_config()
  config.data.name = "image_folder"
  config.data.root = str(root)
  config.data.decoded_cache_mb = 0  # file by file: nothing is decoded here
  config.eval.update(eval_fields)
  return config


def _evaluation_subsets(root):
  """{field: (test-set indices, description)} as the evaluator picks them."""
  config = _cifar10_config(root, num_examples=100, epoch_num_examples=200)
  splits = data.load(config.data)
  evaluator = evaluation.Evaluator.from_config(config,
                                               model=None,
                                               shard_fn=None)
  picked = {}
  for field, count in (("num_examples", evaluator.final_num_examples),
                       ("epoch_num_examples", evaluator.epoch_num_examples)):
    subset, text = evaluator.examples(splits.test, count)
    picked[field] = (subset.indices.tolist(), subset.labels.tolist(), text)
  return picked


_EIGHT_DEVICES = """
import json, sys
import jax
from tests.data import test_subsets
assert jax.device_count() == 8, jax.devices()
print(json.dumps(test_subsets._evaluation_subsets(sys.argv[1])))
"""


def test_cifar10_folder_subsets_hold_every_class_on_1_and_8_devices(
    cifar10_root):
  picked = _evaluation_subsets(cifar10_root)
  for field, per_class in (("num_examples", 10), ("epoch_num_examples", 20)):
    _, labels, text = picked[field]
    np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
    assert text == (f"stratified subset of {10 * per_class} of 10000 test "
                    f"images, {per_class} per class, seed 0")
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _EIGHT_DEVICES,
       str(cifar10_root)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  on_eight = json.loads(proc.stdout.strip().splitlines()[-1])
  assert on_eight == {k: list(v) for k, v in picked.items()}


def test_robustbench_keeps_its_fixed_first_n():
  labels = np.repeat(np.arange(10), 10).astype(np.int32)
  source = data.ArraySource(np.zeros((100, 2, 2, 3), np.uint8), labels)
  subset, text = subsets.first_examples(source, 20, 0, stratified=False)
  np.testing.assert_array_equal(subset.indices, np.arange(20))
  assert "first 20 of 100" in text
  whole, text = subsets.first_examples(source, 0, 0)
  assert whole is source and text == "all 100 test images"

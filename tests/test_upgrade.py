"""A workdir written before the setup restructuring (2026-12-04, the code of
95e2c22: `state.py` saved the checkpoints) resumes and evaluates today.

tests/fixtures/run_2026_12_04/ is that run stopped after step 15 of 30 (its
checkpoint of step 15, config.json, metrics.jsonl up to step 15);
run_2026_12_04_final_params.npz holds the params the uninterrupted run
ended with at step 30, and FINAL_ACCURACY its final evaluation.
"""

import os
import shutil

import jax
import numpy as np

from tests import _tiny
from vitat_jax import checkpointing
from vitat_jax import eval_only
from vitat_jax import setup
from vitat_jax import train

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
RUN = os.path.join(FIXTURES, "run_2026_12_04")
FINAL_PARAMS = os.path.join(FIXTURES, "run_2026_12_04_final_params.npz")
# What the old code's uninterrupted run evaluated at step 30: clean accuracy
# on the first 64 test images (eval.num_examples then took the first N; it
# takes a stratified subset now, issue 26).
FINAL_CLEAN_ACCURACY = 0.375
OVERRIDES = {
    "checkpoint_every_steps": 15,
    "keep_checkpoints": 3,
    "eval.attacks": ("clean", "pgd20"),
    "eval.epoch_num_examples": 0,
    "optim.schedule": "constant",
    "optim.lr": 0.05,
    "epochs": 3.0
}


def _flat(params):
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path,
      v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_a_run_saved_before_the_restructuring_resumes_and_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(RUN, workdir)
  result = train.train_and_evaluate(_tiny.config(**OVERRIDES), workdir)
  assert result["resumed_from_step"] == 15 and result["steps"] == 30
  run = setup.prepare(_tiny.config(**OVERRIDES), workdir, "eval")
  params, where = checkpointing.restore_params(run)
  assert where.endswith("step 30")
  expected = dict(np.load(FINAL_PARAMS))
  ours = _flat(params)
  assert sorted(ours) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6)
  # The same clean accuracy on the images the old run evaluated.
  images, labels = run.splits.test.get_batch(np.arange(64))
  logits = run.model.apply({"params": params}, images.astype(np.float32) / 255)
  assert np.mean(np.argmax(logits, -1) == labels) == FINAL_CLEAN_ACCURACY
  # --mode=eval of the finished run agrees with the run's own evaluation.
  evaluated = eval_only.evaluate_checkpoint(
      _tiny.config(**{
          **OVERRIDES, "eval.attacks": ("clean",)
      }), workdir)
  assert evaluated["clean_acc"] == result["clean_acc"]


def test_a_recorded_momentum_is_the_family_default_only_when_it_equals_it():
  from vitat_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  swin, deit = "swin_tiny_patch4_window7_224", "deit_tiny_patch16_224"
  for name, recorded, upgraded in ((deit, 0.9, None), (swin, 0.5, None),
                                   (swin, 0.9, 0.9), (deit, 0.7,
                                                      0.7), (swin, None, None)):
    config = workdir_lib.upgrade_run_config({
        "model": {
            "name": name
        },
        "optim": {
            "momentum": recorded
        }
    })
    assert config["optim"]["momentum"] == upgraded, (name, recorded)


def test_an_image_folder_run_keeps_the_stats_it_trained_with(tmp_path):
  """Before data.stats an image folder's mean/std came from its folder's
  name; an old run's config evaluates with those, a new one's never does."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from vitat_jax.data import sources  # pylint: disable=g-import-not-at-top
  from vitat_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  for folder_name, stats in (("cifar10-jpeg", "cifar10"),
                             ("CIFAR_100", "cifar100"), ("imagenette", "")):
    root = tmp_path / folder_name
    old = {"data": {"name": "image_folder", "root": str(root), "mean": []}}
    upgraded = workdir_lib.upgrade_run_config(old)["data"]
    assert upgraded["stats"] == stats
    config = default.get_config().data
    config.update(upgraded)
    assert sources.source_default_stats(config) == sources.NAMED_STATS[
        stats or "imagenet"]
  for old in ({"data": {"name": "tfds", "tfds_name": "cifar10"}}, {}):
    assert workdir_lib.upgrade_run_config(old)["data"]["stats"] == ""

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
# What the old code's uninterrupted run evaluated at step 30 (64 images).
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
  params, where = checkpointing.restore_params(
      setup.prepare(_tiny.config(**OVERRIDES), workdir, "eval"))
  assert where.endswith("step 30")
  expected = dict(np.load(FINAL_PARAMS))
  ours = _flat(params)
  assert sorted(ours) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6)
  assert result["clean_acc"] == FINAL_CLEAN_ACCURACY
  # --mode=eval of the finished run: the same clean accuracy.
  evaluated = eval_only.evaluate_checkpoint(
      _tiny.config(**{
          **OVERRIDES, "eval.attacks": ("clean",)
      }), workdir)
  assert evaluated["clean_acc"] == FINAL_CLEAN_ACCURACY

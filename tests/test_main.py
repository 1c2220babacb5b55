"""The command line: a tiny run end to end, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.image_size=8", "--config.data.train_examples=128",
        "--config.model.embed_dim=16", "--config.model.depth=1",
        "--config.model.num_heads=2", "--config.epochs=1",
        "--config.warmup_epochs=1", "--config.attack.steps=1",
        "--config.eval.num_examples=32", "--config.eval.batch_size=32",
        "--config.batch_size=32"]


def _run(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_main_trains_evaluates_and_writes_the_workdir(tmp_path):
  proc = _run(f"--workdir={tmp_path}", *TINY)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "pgd20" in proc.stdout and "cw20" in proc.stdout
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  assert {"clean_acc", "pgd20_acc", "num_eval_images"} <= set(metrics)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["depth"] == 1
  # Orbax's and JAX's INFO chatter stays out of the log.
  assert "orbax" not in proc.stderr


@pytest.mark.parametrize("flag, fragment", [
    ("--config.model.name=vit_huge_patch99_224", "unknown model"),
    ("--config.attack.eps=0", "eps=0"),
    ("--config.data.name=image_folder", "data.root is empty"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, flag, fragment):
  proc = _run(f"--workdir={tmp_path}", *TINY, flag)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_misspelt_override_is_rejected_by_the_locked_config(tmp_path):
  proc = _run(f"--workdir={tmp_path}", "--config.optim.learning_rate=0.1")
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr

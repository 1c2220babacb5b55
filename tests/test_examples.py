"""The examples run as a user runs them, from the repository root
(`python -m examples.<name>`, or `python examples/mlp_gate.py`).

One tiny run of examples/custom_objective.py is trained, SIGKILLed and
resumed (module fixture), then checked against an uninterrupted run and
evaluated by examples/custom_attack.py.
"""

import json
import math
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import _tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 20  # --tiny: 2 epochs of 10 steps, a log line every 5


def _command(example, workdir, *flags):
  return [
      sys.executable, "-m", f"examples.{example}", f"--workdir={workdir}",
      *flags
  ]


def _run(example, workdir, *flags):
  return subprocess.run(_command(example, workdir, *flags),
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=300)


def _logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [l for l in f.read().splitlines() if l.strip().endswith("}")]
  except FileNotFoundError:
    return 0
  return max((json.loads(l)["step"] for l in lines), default=0)


def _kill_at_step(workdir, step):
  """Starts the tiny custom-objective run and SIGKILLs it once `step` is
  logged (mid-run: the rest of training and the evaluations remain)."""
  proc = subprocess.Popen(_command("custom_objective", workdir, "--tiny"),
                          cwd=REPO,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while _logged_step(workdir) < step:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "the run never reached the kill step"
    time.sleep(0.02)
  proc.kill()
  proc.communicate()


def _final_state(workdir):
  return _tiny.newest_checkpoint(workdir)


def _accuracies(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return {k: v for k, v in json.load(f).items() if k.endswith("_acc")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(the killed and resumed run, the uninterrupted one, their outputs)."""
  root = tmp_path_factory.mktemp("examples")
  reference, resumed = str(root / "reference"), str(root / "resumed")
  whole = _run("custom_objective", reference, "--tiny")
  assert whole.returncode == 0, whole.stderr[-3000:]
  _kill_at_step(resumed, 10)
  assert not os.path.exists(os.path.join(resumed, "metrics.json"))
  finished = _run("custom_objective", resumed, "--tiny")
  assert finished.returncode == 0, finished.stderr[-3000:]
  return resumed, reference, whole.stdout, finished.stdout


def test_custom_objective_trains_in_the_full_loop(runs):
  resumed, _, stdout, _ = runs
  assert stdout.startswith("cw_at: clean "), stdout
  with open(os.path.join(resumed, "config.json")) as f:
    assert json.load(f)["method"] == "cw_at"


def test_custom_objective_resumes_bitwise_after_sigkill(runs):
  resumed, reference, whole_stdout, resumed_stdout = runs
  step, state = _final_state(resumed)
  ref_step, ref_state = _final_state(reference)
  assert step == ref_step == TOTAL_STEPS
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert _accuracies(resumed) == _accuracies(reference)
  assert resumed_stdout == whole_stdout


def test_another_objective_in_the_same_workdir_is_refused(runs):
  resumed = runs[0]
  proc = _run("custom_objective", resumed, "--tiny", "--method=at")
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "differs in: method" in errors[0], errors
  assert "Traceback" not in proc.stderr


def test_custom_attack_evaluates_the_trained_run(runs):
  resumed = runs[0]
  proc = _run("custom_attack", resumed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  accuracy = float(proc.stdout.strip().splitlines()[-1].split(": ")[1])
  assert 0 <= accuracy <= 1
  with open(os.path.join(resumed, "robustness.json")) as f:
    results = json.load(f)["results"]
  assert round(results["fgsm"]["accuracy"], 4) == accuracy
  assert set(results) == {"clean", "fgsm", "pgd20"}


def test_mlp_gate_example():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "examples/mlp_gate.py", "--tiny"],
                        cwd=repo,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = re.findall(r"^step (\d+)/8 r=([\d.]+) adversarial loss=(\S+)$",
                     proc.stdout, re.MULTILINE)
  assert [int(step) for step, _, _ in lines] == list(range(1, 9)), proc.stdout
  # r ramps to 1; the loss is finite, near log(10) for 10 random labels.
  assert [float(r) for _, r, _ in lines] == [(i + 1) / 8 for i in range(8)]
  losses = [float(loss) for _, _, loss in lines]
  assert all(math.isfinite(l) and 0 < l < 2 * math.log(10) for l in losses)

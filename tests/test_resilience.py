"""Never lose a run: SIGKILL / SIGTERM and resume, corrupt checkpoints, NaNs."""

import json
import os
import random
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from tests import _tiny
from vitat_jax import checkpointing
from vitat_jax import metric_writers
from vitat_jax import state as state_lib
from vitat_jax import train
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 10 steps per epoch, 3 epochs; a checkpoint every 4 steps and at each epoch
# end, a log line every 3 steps (so most resumes start between log steps:
# the first record after one must still average the same steps). The run
# keeps an EMA of its params (with the decay's warm-up), so every resume
# below must restore the average bit for bit too. A quarter of each batch (8
# of 32 rows) comes from extra data (`data.extra`, an .npz made by
# `_extra_data`), so every resume must also read the same extra rows; 240
# main examples, 24 a step, keep 10 steps per epoch.
FLAGS = [
    "--config.ema.decay=0.9", "--config.ema.warmup=True",
    "--config.data.image_size=8", "--config.data.train_examples=240",
    "--config.data.extra_fraction=0.25", "--config.model.embed_dim=16",
    "--config.model.depth=1", "--config.model.num_heads=2", "--config.epochs=3",
    "--config.tricks.warmup_epochs=1", "--config.attack.steps=2",
    "--config.eval.num_examples=64", "--config.eval.batch_size=32",
    "--config.eval.epoch_num_examples=32", "--config.batch_size=32",
    "--config.checkpoint_every_steps=4", "--config.log_every_steps=3"
]
TOTAL_STEPS = 30
_EXTRA_DATA = {}


@pytest.fixture(scope="module", autouse=True)
def _extra_data(tmp_path_factory):
  """The runs' extra data: 50 random 8-px images of the 10 classes."""
  path = tmp_path_factory.mktemp("extra") / "generated.npz"
  rng = np.random.default_rng(0)
  np.savez(path,
           image=rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 50))
  _EXTRA_DATA["path"] = str(path)


def _command(workdir):
  return [
      sys.executable, "main.py", f"--workdir={workdir}", *FLAGS,
      f"--config.data.extra={_EXTRA_DATA['path']}"
  ]


def _run_to_completion(workdir):
  proc = subprocess.run(_command(workdir),
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _read(workdir, name):
  return (epath.Path(workdir) / name).read_text()


def _logged_steps(workdir):
  try:
    text = _read(workdir, "metrics.jsonl")
  except FileNotFoundError:
    return 0
  lines = text.splitlines()
  steps = [json.loads(l)["step"] for l in lines if l.strip().endswith("}")]
  return max(steps, default=0)


def _start_and_wait_for_step(workdir, step, poll=0.02):
  proc = subprocess.Popen(_command(workdir),
                          cwd=REPO,
                          text=True,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while _logged_steps(workdir) < step:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "the run never reached the kill step"
    time.sleep(poll)
  return proc


def _final_state(workdir):
  return _tiny.newest_checkpoint(workdir)


def _without_timings(records):
  return [{
      k: v for k, v in r.items() if not k.endswith("_time_s")
  } for r in records]


def _outputs(workdir):
  metrics = json.loads(_read(workdir, "metrics.json"))
  records = [
      json.loads(l) for l in _read(workdir, "metrics.jsonl").splitlines()
  ]
  for key in ("train_time_s", "eval_time_s", "wall_time_s", "resumed_from_step",
              "clean_time_s", "pgd20_time_s", "cw20_time_s"):
    metrics.pop(key, None)
  return metrics, _without_timings(records)


def _assert_ends_as_the_reference(workdir, reference_run):
  """The final state bitwise, metrics.json and metrics.jsonl (less timings)
  equal the uninterrupted run's."""
  step, state = _final_state(workdir)
  ref_step, ref_state = _final_state(reference_run)
  assert step == ref_step == TOTAL_STEPS
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  metrics, records = _outputs(workdir)
  ref_metrics, ref_records = _outputs(reference_run)
  assert metrics == ref_metrics
  assert records == ref_records


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _run_to_completion(workdir)
  return workdir


def test_sigkill_at_random_steps_then_rerun_is_bitwise_identical(
    reference_run, tmp_path):
  ref_step, ref_state = _final_state(reference_run)
  ref_metrics, ref_records = _outputs(reference_run)
  assert ref_step == TOTAL_STEPS
  assert ref_state["ema_params"] is not None  # the average is in the state
  assert ref_metrics["weights"] == "ema"  # and it was evaluated
  kill_steps = sorted(random.Random(0).sample(range(2, TOTAL_STEPS - 2), 3))
  for kill_step in kill_steps:
    workdir = str(tmp_path / f"killed_at_{kill_step}")
    proc = _start_and_wait_for_step(workdir, kill_step)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _logged_steps(workdir) < TOTAL_STEPS
    _run_to_completion(workdir)
    step, state = _final_state(workdir)
    assert step == TOTAL_STEPS
    jax.tree.map(np.testing.assert_array_equal, state, ref_state)
    metrics, records = _outputs(workdir)
    assert metrics == ref_metrics, kill_step
    assert records == ref_records, kill_step


def _wait_for_line(proc, fragment, timeout):
  """Reads `proc`'s stderr until a line holds `fragment`; returns a function
  giving every line read so far (a thread keeps reading to the end)."""
  lines, seen = [], threading.Event()

  def read():
    for line in proc.stderr:
      lines.append(line)
      if fragment in line:
        seen.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert seen.wait(timeout), "".join(lines)[-3000:]

  def all_lines():
    reader.join(timeout=60)
    return lines

  return all_lines


def _stop_message(stderr):
  lines = [l for l in stderr.splitlines() if "stopped by SIGTERM" in l]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_sigterm_in_training_and_in_the_final_evaluation_then_resume_is_bitwise_identical(  # pylint: disable=line-too-long
    reference_run, tmp_path):
  workdir = str(tmp_path)
  proc = _start_and_wait_for_step(workdir, 5)
  # A second run in the same workdir is refused in one line while the first
  # (paused, so that it is surely still running) holds the lock.
  proc.send_signal(signal.SIGSTOP)
  second = subprocess.run(_command(workdir),
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=300)
  assert second.returncode == 2, second.stderr[-3000:]
  errors = [l for l in second.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "in use by a running training" in errors[0]
  assert f"PID {proc.pid}" in errors[0]
  proc.send_signal(signal.SIGCONT)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  message = _stop_message(stderr)
  stopped_at = int(message.split("after step ")[1].split(";")[0])
  assert 5 <= stopped_at < TOTAL_STEPS
  assert checkpointing.checkpoint_manager(workdir).latest_step() == stopped_at
  assert not os.path.exists(os.path.join(workdir, "run.lock"))

  # Resume; SIGTERM once training is over and the final evaluation runs.
  # Without the session's compilation cache (tests/conftest.py) or any
  # other, so that the final evaluation compiles, as in a first run, and the
  # signal lands in it.
  env = {
      k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"
  }
  proc = subprocess.Popen(_command(workdir) +
                          ["--config.compilation_cache_dir="],
                          cwd=REPO,
                          text=True,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  # Into the final evaluation: the signal follows its first log line.
  stderr_lines = _wait_for_line(proc, "final evaluation:", timeout=240)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  stderr = "".join(stderr_lines())
  assert proc.returncode == 0, stderr[-3000:]
  assert "during the final evaluation" in _stop_message(stderr)
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))

  _run_to_completion(workdir)
  _assert_ends_as_the_reference(workdir, reference_run)


def _mount_small_tmpfs(path, size):
  """Whether a tmpfs of `size` could be mounted at `path` (root only)."""
  try:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
         str(path)],
        check=True,
        capture_output=True,
        timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return True


def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes_bitwise(
    reference_run, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  # Room for the config, the metrics and about two checkpoints (~160 KB each
  # in 4 KB pages): the disk fills during the second or third save.
  mounted = _mount_small_tmpfs(disk, "320k")
  workdir = str(disk / "run")
  try:
    command = _command(workdir)
    if not mounted:  # a write hook raising ENOSPC in the second save
      command = [sys.executable, "tests/_full_disk_main.py", *command[2:]]
    proc = subprocess.run(command,
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "is full" in errors[0] and "rerun the same command" in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    saved = workdir_lib.saved_steps(workdir)
    assert saved and max(saved) < TOTAL_STEPS, saved
    if mounted:  # space freed
      subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    rerun = _run_to_completion(workdir)
    assert f"resuming at step {max(saved)}" in rerun.stderr
  finally:
    if mounted:
      shutil.copytree(workdir, tmp_path / "run")
      subprocess.run(["umount", str(disk)], check=False)
      workdir = str(tmp_path / "run")
  _assert_ends_as_the_reference(workdir, reference_run)


def test_full_disk_tracebacks_of_background_threads_are_kept_out_of_the_log():
  """What the full-disk run above prints depends on which write fills the
  disk first: every form seen is filtered, the one error line stays."""
  import errno
  import logging
  from vitat_jax import cli
  quiet = cli.QuietLibraries()
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": "
                    "No space left on device [os_error_code='28']")
  seen = [
      ("asyncio", "/usr/lib/python3.11/asyncio/base_events.py",
       "Task exception was never retrieved", (ValueError, full, None)),
      ("absl", "/venv/orbax/checkpoint/_src/futures/future.py",
       "_SignalingThread.run() raised an exception", (ValueError, full, None)),
      ("absl", "/venv/orbax/checkpoint/x.py",
       "write failed: [Errno 28] No space left on device", None),
  ]
  for name, pathname, msg, exc_info in seen:
    record = logging.LogRecord(name, logging.ERROR, pathname, 1, msg, (),
                               exc_info)
    assert not quiet.filter(record), (name, msg)
  other = logging.LogRecord("absl", logging.ERROR, "/venv/orbax/x.py", 1,
                            "something else failed", (),
                            (ValueError, ValueError("other"), None))
  assert quiet.filter(other)
  assert cli.disk_full(OSError(errno.ENOSPC, "No space left on device"))
  chained = RuntimeError("save failed")
  chained.__cause__ = full
  assert "No space left" in cli.disk_full(chained)
  assert cli.disk_full(ValueError("other")) is None


def _corrupt(workdir, step):
  state_dir = os.path.join(workdir_lib.checkpoints_dir(workdir), str(step),
                           "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  workdir = str(tmp_path)
  config = _tiny.config(checkpoint_every_steps=5)
  train.train_and_evaluate(config, workdir)  # checkpoints 10, 15, 20 kept
  _corrupt(workdir, 20)
  # What a SIGKILL or a full disk leaves in the other files of a workdir: a
  # half-written last line of metrics.jsonl, a truncated config.json and
  # metrics.json, a lock file of a dead process holding garbage.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 21, "train_lo')
  for name in ("config.json", "metrics.json", "robustness.json",
               "robustness.md", "learning_curves.png"):
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
  with open(os.path.join(workdir, "run.lock"), "w") as f:
    f.write("\x00garbage")
  events = os.path.join(workdir, "tensorboard")
  for name in os.listdir(events):  # TensorBoard's event files, cut short
    with open(os.path.join(events, name), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(events, name)) // 2)
  result = train.train_and_evaluate(config, workdir)
  assert result["resumed_from_step"] == 15
  with open(os.path.join(workdir, "robustness.json")) as f:
    assert json.load(f)["results"]["clean"]["accuracy"] == result["clean_acc"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f]
  assert steps == sorted(steps) and steps[-1] == 20
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["seed"] == config.seed
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["resumed_from_step"] == 15
  for step in checkpointing.checkpoint_manager(workdir).all_steps():
    _corrupt(workdir, step)
  with pytest.raises(UserError, match="--overwrite") as info:
    train.train_and_evaluate(config, workdir)
  assert "\n" not in str(info.value)
  result = train.train_and_evaluate(config, workdir, overwrite=True)
  assert result["resumed_from_step"] == 0


def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  from vitat_jax import parallel
  real_shard = parallel.shard_batch
  calls = {"n": 0}

  def poisoned(mesh, batch):
    calls["n"] += 1
    images, labels = batch
    if calls["n"] == 6:  # step 6 gets a NaN pixel
      images = images.astype(np.float32)
      images[0, 0, 0, 0] = np.nan
    return real_shard(mesh, (images, labels))

  monkeypatch.setattr(parallel, "shard_batch", poisoned)
  workdir = str(tmp_path)
  config = _tiny.config(checkpoint_every_steps=1, log_every_steps=2)
  with pytest.raises(FloatingPointError, match="non-finite loss") as info:
    train.train_and_evaluate(config, workdir)
  assert "at step 6" in str(info.value) and "\n" not in str(info.value)
  mngr = checkpointing.checkpoint_manager(workdir)
  assert mngr.latest_step() == 5  # the last good step, nothing after it
  restored = mngr.restore(
      5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  for leaf in jax.tree.leaves(restored.state["params"]):
    assert np.all(np.isfinite(leaf))


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path):
  workdir = str(tmp_path)
  config = _tiny.config(
      **{
          "optim.grad_clip": 0.0,
          "optim.lr": 1e12,
          "checkpoint_every_steps": 1,
          "log_every_steps": 1
      })
  with pytest.raises(FloatingPointError, match="gradient clipping is off") as e:
    train.train_and_evaluate(config, workdir)
  assert "\n" not in str(e.value)
  # The save in flight when the NaN was seen was finished, not abandoned.
  leftovers = [
      n for n in os.listdir(workdir_lib.checkpoints_dir(workdir))
      if not n.isdigit()
  ]
  assert not leftovers, leftovers
  mngr = checkpointing.checkpoint_manager(workdir)
  assert mngr.all_steps()
  for step in mngr.all_steps():
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    for leaf in jax.tree.leaves(restored.state["params"]):
      assert np.all(np.isfinite(leaf)), step


@pytest.fixture(name="gcs")
def _gcs(tmp_path, monkeypatch):
  """A GCS emulator on 127.0.0.1 with a bucket "bucket"; gcsfs (epath) and
  tensorstore (orbax's arrays) pointed at it, here and in children."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with open(tmp_path / "emulator.log", "w") as log:
    server = subprocess.Popen([
        sys.executable,
        os.path.join(REPO, "tests", "_gcs_emulator.py"),
        str(port), "bucket"
    ],
                              stdout=log,
                              stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, (
          tmp_path / "emulator.log").read_text()[-2000:]
      time.sleep(0.1)
  yield "gs://bucket"
  server.kill()
  server.wait()


def test_a_gcs_workdir_is_killed_resumed_and_ends_as_a_local_run(
    reference_run, gcs):
  """Every workdir file through epath: checkpoints (orbax and tensorstore),
  config.json, metrics.jsonl, TensorBoard, metrics/robustness, plots."""
  workdir = gcs + "/runs/at"
  proc = _start_and_wait_for_step(workdir, 9, poll=0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  # (the save of step 8 may still be in flight: then 4 is the newest)
  assert 4 <= max(workdir_lib.saved_steps(workdir)) < TOTAL_STEPS
  rerun = _run_to_completion(workdir)
  assert "resuming at step" in rerun.stderr
  assert "Could not determine bucket type" not in rerun.stderr
  _assert_ends_as_the_reference(workdir, reference_run)
  names = {p.name for p in epath.Path(workdir).iterdir()}
  assert {
      "config.json", "robustness.json", "robustness.md", "learning_curves.png",
      "tensorboard", "checkpoints"
  } <= names, names
  scalars = metric_writers.read_tensorboard_scalars(workdir)
  assert [s for s, _ in scalars["train/loss"]
         ] == list(range(3, TOTAL_STEPS + 1, 3))
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing local

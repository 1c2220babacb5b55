"""Bad configs and inputs through main.py: one line, no traceback, no compile,
and an existing workdir left exactly as it was."""

import concurrent.futures
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_main import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(tmp):
  """Files the table needs: an empty image folder, wrong checkpoints."""
  empty = tmp / "empty_folder"
  for split in ("train", "test"):
    (empty / split / "cat").mkdir(parents=True)
  from vitat_jax import checkpoints
  from vitat_jax import models
  wider = models.create("deit_tiny_patch16_224", num_classes=10, img_size=8,
                        patch_size=4, embed_dim=32, depth=1, num_heads=2)
  wide_ckpt = str(tmp / "wider.safetensors")
  checkpoints.export_timm(
      wider.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
      ["params"], wider, wide_ckpt)
  text = tmp / "weights.txt"
  text.write_text("not a checkpoint")
  return {"empty": str(empty), "wide_ckpt": wide_ckpt, "text": str(text)}


# (flags, expected fragment of the one-line error, extra environment)
CASES = [
    (["--config.model.name=vit_tiny_patch16_22"], "unknown model", None),
    (["--config.model.name=resnet50"], "unknown model", None),
    (["--config.model.patch_size=3"], "does not divide", None),
    (["--config.model.num_heads=3"], "num_heads", None),
    (["--config.attack.eps=0"], "eps=0", None),
    (["--config.attack.eps=-0.1"], "eps=-0.1", None),
    (["--config.attack.eps=2"], "eps=2", None),
    (["--config.attack.alpha=0.5"], "cannot exceed", None),
    (["--config.attack.alpha=0"], "alpha=0", None),
    (["--config.attack.steps=0"], "steps=0", None),
    (["--config.method=fgsm"], "unknown method", None),
    (["--config.data.name=svhn"], "unknown dataset", None),
    (["--config.data.name=image_folder"], "data.root is empty", None),
    (["--config.data.name=image_folder", "--config.data.root=/no/such/dir"],
     "does not exist", None),
    (["--config.data.name=image_folder", "--config.data.root={empty}"],
     "images under", None),
    (["--config.data.name=tfds", "--config.data.tfds_data_dir={tmp}/tfds"],
     "tfds", None),
    (["--config.optim.name=lamb"], "unknown optimizer", None),
    (["--config.optim.schedule=step"], "unknown lr schedule", None),
    (["--config.optim.lr=0"], "optim.lr", None),
    (["--config.optim.grad_clip=-1"], "grad_clip", None),
    (["--config.epochs=0"], "epochs=0", None),
    (["--config.batch_size=0"], "batch_size", None),
    (["--config.eval.batch_size=0"], "batch_size", None),
    (["--config.warmup_epochs=5"], "warmup_epochs=5", None),
    (["--config.drop_rate=1.5"], "drop_rate", None),
    (["--config.fsdp_min_size=0"], "fsdp_min_size", None),
    (["--config.eval.attacks=('clean','pgd')"], "unknown evaluation attack",
     None),
    (["--config.eval.eps=1.5"], "eval.eps", None),
    (["--config.eval.alpha=0.9"], "eval.alpha", None),
    (["--config.mixup.prob=1.5"], "mixup.prob", None),
    (["--config.mixup.label_smoothing=1.0"], "label_smoothing", None),
    (["--config.log_every_steps=0"], "log_every_steps", None),
    (["--config.init.checkpoint={tmp}/missing.safetensors"], "does not exist",
     None),
    (["--config.init.checkpoint={wide_ckpt}"], "wider", None),
    (["--config.init.checkpoint={text}"], "format", None),
    (["--config.batch_size=12"], "not divisible by the 8 devices",
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
    (["--config.num_devices=16"], "more than the 8 devices present",
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
    (["--mode=eval"], "no checkpoint", None),
]


def _snapshot(path):
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = os.stat(full).st_mtime_ns
  return out


def _run(args, workdir, env_extra):
  env = dict(os.environ, JAX_LOG_COMPILES="1", **(env_extra or {}))
  return subprocess.run(
      [sys.executable, "main.py", f"--workdir={workdir}", *TINY, *args],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_bad_inputs_fail_in_one_line_before_any_compilation(tmp_path):
  assert len(CASES) >= 30
  files = _files(tmp_path)
  jobs = []
  for index, (flags, fragment, env) in enumerate(CASES):
    flags = [f.format(tmp=tmp_path, **files) for f in flags]
    # An existing workdir (no config.json) that must stay exactly as it is.
    workdir = tmp_path / f"workdir_{index}"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "notes.txt").write_text("keep me")
    jobs.append((flags, fragment, env, workdir, _snapshot(workdir)))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    procs = list(pool.map(lambda j: _run(j[0], j[3], j[2]), jobs))
  for (flags, fragment, _, workdir, before), proc in zip(jobs, procs):
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2, (flags, proc.stderr[-1500:])
    assert len(errors) == 1 and fragment in errors[0], (flags, errors,
                                                        proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, flags
    assert "Compiling" not in proc.stderr, (flags, proc.stderr[-1500:])
    assert _snapshot(workdir) == before, flags


def test_a_workdir_with_another_run_is_refused_untouched(tmp_path):
  first = _run([], tmp_path, None)
  assert first.returncode == 0, first.stderr[-1500:]
  before = _snapshot(tmp_path)
  proc = _run(["--config.attack.steps=2"], tmp_path, None)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "different config" in errors[0]
  assert "--overwrite" in errors[0]
  assert _snapshot(tmp_path) == before

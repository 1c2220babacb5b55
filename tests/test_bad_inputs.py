"""Bad inputs through main.py, as a new user would type them: exit code 2,
exactly one `error:` line naming the bad value and what to do, no traceback,
nothing compiled (JAX_LOG_COMPILES=1), and the workdir byte for byte as it
was.

Every command line runs main.py as `__main__` with its own argv, stdout,
stderr and exit status, in a fork of one interpreter that imported JAX once
(tests/_main_runner.py): a real `python main.py ...` each, at a fraction of
the start-up cost.
"""

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_main import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES_8 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


class _Payload:
  """Unpickling this writes a marker file: code execution."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _files(tmp):
  """Inputs the table refers to: image folders, config files, weights."""
  import torch
  from tests import _tiny
  from vitat_jax import pretrained
  files = {"tmp": str(tmp)}
  empty = tmp / "empty_folder"
  for split in ("train", "test"):
    (empty / split / "cat").mkdir(parents=True)
  files["empty"] = str(empty)
  # One class with images, one empty class folder in train.
  from PIL import Image
  one_empty = tmp / "one_empty_class"
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      (one_empty / split / cls).mkdir(parents=True)
      if split == "test" or cls == "cat":
        Image.new("RGB", (8, 8)).save(one_empty / split / cls / "a.png")
  files["one_empty"] = str(one_empty)
  no_test = tmp / "no_test"
  (no_test / "train" / "cat").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(no_test / "train" / "cat" / "a.png")
  files["no_test"] = str(no_test)
  for name, target in (("dangling", "/no/such/image.png"), ("looping",
                                                            "b.png")):
    folder = tmp / name
    for split in ("train", "test"):
      (folder / split / "cat").mkdir(parents=True)
      Image.new("RGB", (8, 8)).save(folder / split / "cat" / "a.png")
    os.symlink(target, folder / "train" / "cat" / "b.png")
    files[name] = str(folder)

  wider = _tiny.model(embed_dim=32)
  wide = str(tmp / "wider.safetensors")
  pretrained.export_timm(
      wider.init(jax.random.key(0), np.zeros(
          (1, 8, 8, 3), np.float32))["params"], wider, wide)
  files["wide_ckpt"] = wide
  data = open(wide, "rb").read()
  (tmp / "truncated.safetensors").write_bytes(data[:len(data) // 2])
  header = json.dumps([1, 2]).encode()
  (tmp / "list_header.safetensors"
  ).write_bytes(struct.pack("<Q", len(header)) + header)
  (tmp / "garbage.safetensors").write_bytes(b"\x00" * 4)
  np.savez(tmp / "w.npz", a=np.zeros(1000, np.float32))
  data = (tmp / "w.npz").read_bytes()
  (tmp / "truncated.npz").write_bytes(data[:len(data) // 2])
  torch.save({"a": torch.zeros(1000)}, tmp / "w.pth")
  data = (tmp / "w.pth").read_bytes()
  (tmp / "truncated.pth").write_bytes(data[:len(data) // 2])
  files["marker"] = str(tmp / "pwned")
  with open(tmp / "evil.pth", "wb") as f:
    pickle.dump({"a": _Payload(files["marker"])}, f)
  (tmp / "weights.txt").write_text("not a checkpoint")
  (tmp / "a_dir").mkdir()
  (tmp / "a_file").write_text("x")
  # Extra training data: 8-px images, labels of 10 classes (and one 10).
  labels = np.arange(20) % 10
  np.savez(tmp / "extra.npz",
           image=np.zeros((20, 8, 8, 3), np.uint8),
           label=labels)
  np.savez(tmp / "extra_range.npz",
           image=np.zeros((20, 8, 8, 3), np.uint8),
           label=labels + 1)

  # Weights of the tiny model (tests/_tiny.model()) holding a NaN, and
  # the same weights as integers.
  from vitat_jax.pretrained import io as weights_io
  tiny = _tiny.model()
  tiny_path = str(tmp / "tiny.safetensors")
  pretrained.export_timm(
      tiny.init(jax.random.key(0), np.zeros(
          (1, 8, 8, 3), np.float32))["params"], tiny, tiny_path)
  tensors = weights_io.read_safetensors(tiny_path)
  with_nan = dict(
      tensors, **{
          "blocks.0.attn.qkv.weight":
              np.full_like(tensors["blocks.0.attn.qkv.weight"], np.nan)
      })
  weights_io.write_safetensors(with_nan, str(tmp / "nan.safetensors"))
  weights_io.write_safetensors(
      {
          k: v.astype(np.int32) for k, v in tensors.items()
      }, str(tmp / "int.safetensors"))
  # Three classes: too few for AutoAttack's targeted attacks.
  three = tmp / "three_classes"
  for split in ("train", "test"):
    for cls in ("a", "b", "c"):
      (three / split / cls).mkdir(parents=True)
      Image.new("RGB", (8, 8)).save(three / split / cls / "x.png")
  files["three"] = str(three)
  # A file name that is not UTF-8.
  non_utf8 = tmp / "non_utf8"
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      (non_utf8 / split / cls).mkdir(parents=True)
      Image.new("RGB", (8, 8)).save(non_utf8 / split / cls / "a.png")
  Image.new("RGB", (8, 8)).save(
      os.fsdecode(
          os.fsencode(str(non_utf8 / "train" / "cat")) + b"/\xff\xfe.png"))
  files["non_utf8"] = str(non_utf8)

  (tmp / "syntax.py").write_text("def get_config(:\n")
  (tmp / "no_get_config.py").write_text("x = 1\n")
  (tmp / "raises.py"
  ).write_text("def get_config():\n  raise RuntimeError('broken on purpose')\n")
  for name in ("truncated.safetensors", "list_header.safetensors",
               "garbage.safetensors", "truncated.npz", "truncated.pth",
               "evil.pth", "weights.txt", "a_dir", "a_file", "syntax.py",
               "no_get_config.py", "raises.py", "nan.safetensors",
               "int.safetensors", "extra.npz", "extra_range.npz"):
    files[name.replace(".", "_")] = str(tmp / name)
  return files


C = "--config."
# (command line, fragment of the one error line, workdir kind, environment)
# Workdir kinds: plain (a checkpoints/ folder and a note), trained (a copy of
# a finished tiny run), locked (the same, its lock held by a live process),
# report (a finished run whose metrics.json is corrupt), corrupt (a finished
# run whose checkpoints are all unreadable), foreign (checkpoints/
# holds a file that is not a checkpoint), file (the workdir is a file),
# under_file (the workdir is below a file), none (no --workdir flag).
CASES = [
    # -- config fields, one per check of validate.check_config
    ([C + "model.name=vit_tiny_patch16_22"], "unknown model", "plain", None),
    ([C + "model.name=resnet50"], "unknown model", "plain", None),
    # Named before its pre-trained file is looked for.
    (["--config=configs/cifar10.py:model=deit_tiny_patch16_244"],
     "unknown model 'deit_tiny_patch16_244': did you mean "
     "deit_tiny_patch16_224", "plain", None),
    ([C + "model.patch_size=3"], "does not divide", "plain", None),
    ([C + "model.num_heads=3"], "num_heads", "plain", None),
    ([C + "model.drop_path_rate=2.0"], "drop_path_rate=2.0", "plain", None),
    ([C + "model.drop_path_rate=-0.1"], "drop_path_rate=-0.1", "plain", None),
    ([C + "model.depth=0"], "model.depth=0", "plain", None),
    ([C + "model.embed_dim=-16"], "model.embed_dim=-16", "plain", None),
    ([C + "model.mlp_ratio=0"], "mlp_ratio=0", "plain", None),
    ([C + "attack.eps=0"], "eps=0", "plain", None),
    ([C + "attack.eps=-0.1"], "eps=-0.1", "plain", None),
    ([C + "attack.eps=2"], "eps=2", "plain", None),
    ([C + "attack.alpha=0.5"], "cannot exceed", "plain", None),
    ([C + "attack.alpha=0"], "alpha=0", "plain", None),
    ([C + "attack.steps=0"], "steps=0", "plain", None),
    ([C + "attack.name=fgsm"], "unknown attack.name 'fgsm': use one of pgd, "
     "apgd", "plain", None),
    ([C + "method=fgsm"], "unknown method", "plain", None),
    ([C + "beta=-1"], "beta=-1", "plain", None),
    ([C + "beta=nan"], "beta=nan", "plain", None),
    ([C + "data.name=svhn"], "unknown dataset", "plain", None),
    ([C + "data.name=image_folder"], "data.root is empty", "plain", None),
    ([C + "data.name=image_folder",
      C + "data.root=/no/such/dir"], "/no/such/dir", "plain", None),
    ([C + "data.name=image_folder",
      C + "data.root={empty}"], "images under", "plain", None),
    ([C + "data.name=image_folder",
      C + "data.root={one_empty}"], "dog has no", "plain", None),
    ([C + "data.name=image_folder",
      C + "data.root={no_test}"], "test", "plain", None),
    ([C + "data.name=image_folder",
      C + "data.root={dangling}"], "b.png is a broken", "plain", None),
    ([C + "data.name=image_folder", C + "data.root={looping}"],
     "b.png is a broken or looping", "plain", None),
    ([C + "data.name=tfds",
      C + "data.tfds_data_dir={tmp}/tfds"], "tfds", "plain", None),
    ([C + "data.name=tfds", C + "data.tfds_name="], "tfds_name", "plain", None),
    ([C + "data.image_size=-8"], "data.image_size=-8", "plain", None),
    ([C + "data.train_examples=-1"], "train_examples=-1", "plain", None),
    ([C + "data.test_examples=-5"], "test_examples=-5", "plain", None),
    ([C + "data.subset_seed=-1"], "subset_seed=-1", "plain", None),
    ([C + "data.mean=(0.5,0.5)"], "data.mean", "plain", None),
    ([C + "data.std=(0.5,0.0,0.5)"], "data.std", "plain", None),
    ([C + "data.cache_dir={a_file}"], "is a file", "plain", None),
    ([C + "data.extra={tmp}/nope.npz",
      C + "data.extra_fraction=0.5"], "nope.npz does not exist", "plain", None),
    ([C + "data.extra={extra_npz}", C + "data.extra_fraction=1.5"],
     "data.extra_fraction=1.5 must be in (0, 1)", "plain", None),
    ([C + "data.extra_fraction=0.5"], "without data.extra", "plain", None),
    ([C + "data.extra={a_file}",
      C + "data.extra_fraction=0.5"], "is not an .npz", "plain", None),
    ([C + "data.extra={extra_range_npz}", C + "data.extra_fraction=0.5"],
     "has label 10, outside the main set's 10 classes", "plain", None),
    ([C + "optim.name=lamb"], "unknown optimizer", "plain", None),
    ([C + "optim.schedule=step"], "unknown lr schedule", "plain", None),
    ([C + "optim.lr=0"], "optim.lr=0", "plain", None),
    ([C + "optim.lr=nan"], "optim.lr=nan", "plain", None),
    ([C + "optim.lr=inf"], "optim.lr=inf", "plain", None),
    ([C + "optim.lr=-0.1"], "optim.lr=-0.1", "plain", None),
    ([C + "optim.grad_clip=-1"], "grad_clip", "plain", None),
    ([C + "optim.weight_decay=-0.0001"], "weight_decay", "plain", None),
    ([C + "optim.momentum=1.5"], "momentum=1.5", "plain", None),
    ([C + "optim.warmup_epochs=5"], "optim.warmup_epochs=5", "plain", None),
    ([C + "epochs=0"], "epochs=0", "plain", None),
    ([C + "epochs=-1"], "epochs=-1", "plain", None),
    ([C + "epochs=nan"], "epochs=nan", "plain", None),
    ([C + "epochs=0.01",
      C + "tricks.warmup_epochs=0"], "0 training steps", "plain", None),
    ([C + "batch_size=0"], "batch_size", "plain", None),
    ([C + "batch_size=-32"], "batch_size", "plain", None),
    ([C + "eval.batch_size=0"], "batch_size", "plain", None),
    ([C + "tricks.warmup_epochs=5"], "warmup_epochs=5", "plain", None),
    ([C + "tricks.warmup_epochs=-1"], "warmup_epochs=-1", "plain", None),
    ([C + "tricks.final_keep_rate=1.5"], "final_keep_rate=1.5", "plain", None),
    ([C + "fsdp_min_size=0"], "fsdp_min_size=0", "plain", None),
    ([C + "accum_steps=3"], "accum_steps=3", "plain", None),
    ([C + "num_devices=-1"], "num_devices=-1", "plain", None),
    ([C + "compute_dtype=float64"], "float64", "plain", None),
    ([C + "seed=-1"], "seed=-1", "plain", None),
    ([C + "augment.crop_padding=-4"], "crop_padding=-4", "plain", None),
    ([C + "augment.randaugment=rand-x9"], "rand-x9", "plain", None),
    ([C + "mixup.prob=1.5"], "mixup.prob", "plain", None),
    ([C + "mixup.label_smoothing=1.0"], "label_smoothing", "plain", None),
    ([C + "mixup.mixup_alpha=-1"], "mixup", "plain", None),
    ([C + "log_every_steps=0"], "log_every_steps", "plain", None),
    ([C + "checkpoint_every_steps=0"], "checkpoint_every_steps", "plain", None),
    ([C + "checkpoint_every_epochs=-1"], "checkpoint_every_epochs=-1", "plain",
     None),
    (["--workdir=nosuchscheme://bucket/run"], "cannot be reached", "none",
     None),
    ([C + "keep_checkpoints=0"], "keep_checkpoints=0", "plain", None),
    ([C + "keep_checkpoints=-1"], "keep_checkpoints=-1", "plain", None),
    ([C + "eval.attacks=('clean','pgd')"], "unknown evaluation attack", "plain",
     None),
    ([C + "eval.attacks=()"], "eval.attacks is empty", "plain", None),
    ([C + "eval.epoch_attacks=()", C + "eval.epoch_num_examples=32"],
     "eval.epoch_attacks is empty", "plain", None),
    ([C + "eval.eps=1.5"], "eval.eps=1.5", "plain", None),
    ([C + "eval.eps=0"], "eval.eps=0", "plain", None),
    ([C + "eval.alpha=0.9"], "eval.alpha", "plain", None),
    ([C + "eval.restarts=0"], "eval.restarts=0", "plain", None),
    ([C + "eval.num_examples=-5"], "eval.num_examples=-5", "plain", None),
    ([C + "eval.epoch_num_examples=-1"], "epoch_num_examples=-1", "plain",
     None),
    ([C + "init.format=onnx"], "onnx", "plain", None),
    ([C + "batch_size=12"], "not divisible by the 8 devices", "plain",
     DEVICES_8),
    ([C + "num_devices=16"], "more than the 8 devices present", "plain",
     DEVICES_8),
    ([C + "data.extra={extra_npz}", C + "data.extra_fraction=0.3"
     ], "the 8 devices do not share evenly; use e.g. data.extra_fraction=0.25",
     "plain", DEVICES_8),
    # -- flags: misspelt fields, values of the wrong type, unknown flags
    ([C + "optim.lrr=0.1"], "did you mean optim.lr?", "plain", None),
    ([C + "eval.attackz=('clean',)"], "did you mean eval.attacks?", "plain",
     None),
    ([C + "modle.name=vit"], "modle.name", "plain", None),
    ([C + "epochs=abc"], "epochs=abc", "plain", None),
    ([C + "tricks.ard=maybe"], "ard=maybe", "plain", None),
    (["--mode=tran"], "tran", "plain", None),
    (["stray_argument"], "stray_argument", "plain", None),
    (["--workdirr=x"], "workdirr", "plain", None),
    # -- config files
    (["--config=configs/nope.py"], "configs/nope.py", "plain", None),
    (["--config={syntax_py}"], "syntax.py", "plain", None),
    (["--config={no_get_config_py}"], "no get_config", "plain", None),
    (["--config={raises_py}"], "broken on purpose", "plain", None),
    # -- :arg values of the paper's configs
    (["--config=configs/cifar10.py:modle=deit_tiny_patch16_224"],
     "did you mean model?", "plain", None),
    (["--config=configs/cifar10.py:source=lmdb"], "lmdb", "plain", None),
    (["--config=configs/cifar10.py:ard=yes"], "ard='yes'", "plain", None),
    (["--config=configs/cifar10.py:pretrained=in2k"], "in2k", "plain", None),
    (["--config=configs/cifar10.py:model"], "'model'", "plain", None),
    (["--config=configs/studies.py:study=nope"], "nope", "plain", None),
    (["--config=configs/imagenet.py:accum_steps=two"], "accum_steps='two'",
     "plain", None),
    # -- weight files for init.checkpoint
    ([C + "init.checkpoint={tmp}/missing.safetensors"], "does not exist",
     "plain", None),
    ([C + "init.checkpoint={a_dir}"], "is a directory", "plain", None),
    ([C + "init.checkpoint={wide_ckpt}"], "wider", "plain", None),
    ([C + "init.checkpoint={weights_txt}"], "format", "plain", None),
    ([C + "init.checkpoint={truncated_safetensors}"], "truncated", "plain",
     None),
    ([C + "init.checkpoint={list_header_safetensors}"], "header", "plain",
     None),
    ([C + "init.checkpoint={garbage_safetensors}"], "garbage.safetensors",
     "plain", None),
    ([C + "init.checkpoint={truncated_npz}"], "truncated", "plain", None),
    ([C + "init.checkpoint={truncated_pth}"], "truncated", "plain", None),
    ([C + "init.checkpoint={evil_pth}"], "allow_pickle=True only if", "plain",
     None),
    # -- workdirs
    ([], "is a file", "file", None),
    ([], "which is a file", "under_file", None),
    (["--overwrite"], "not a checkpoint of a run", "foreign", None),
    (["--mode=eval"], "no checkpoint", "plain", None),
    (["--mode=export"], "no checkpoint", "plain", None),
    (["--mode=export", "--config.init.checkpoint={tmp}/w.npz"],
     "drop --config.init.checkpoint", "plain", None),
    ([C + "optim.lr=0.5"], "differs in: optim.lr", "trained_no_json", None),
    ([C + "model.depth=2"], "model.depth", "trained_no_json", None),
    ([C + "attack.steps=2"], "different config", "trained", None),
    ([C + "data.train_examples=96"], "data.train_examples", "trained", None),
    ([C + "keep_checkpoints=0"], "keep_checkpoints=0", "trained", None),
    ([], "in use by a running training", "locked", None),
    ([], "none of the checkpoints", "corrupt", None),
    (["--mode=eval"], "none of the checkpoints", "corrupt", None),
    ([C + "init.checkpoint={truncated_safetensors}",
      "--mode=eval"], "truncated", "plain", None),
    # -- the third round (issue 26 item 8)
    # Nothing written outside the workdir.
    (["--mode=export"], "export is a symbolic link", "export_link", None),
    (["--mode=export"], "model_card.json is a folder where", "card_dir", None),
    (["--overwrite"], "--overwrite deletes this folder", "checkpoints_link",
     None),
    ([], "tensorboard is a symbolic link", "tensorboard_link", None),
    (["--mode=eval", C + "eval.save_adversarial=True"],
     "adversarial is a symbolic link", "adversarial_link", None),
    ([
        "--mode=eval", C + "eval.save_adversarial=True",
        C + "eval.attacks=('clean','aa')"
    ], "adversarial is a file where", "adversarial_file", None),
    (["--mode=report"], "learning_curves.png is a symbolic link", "plot_link",
     None),
    # Bounded, one-line multi-host joins.
    (["--coordinator_address=localhost", "--num_processes=2",
      "--process_id=1"], "must be host:port", "plain", None),
    ([
        "--coordinator_address=127.0.0.1:1", "--num_processes=2",
        "--process_id=1", "--coordinator_timeout=1"
    ], "127.0.0.1:1 (process 0) cannot be reached after 1 s", "plain", None),
    # Paths and names the file system or the cache cannot take.
    (["--workdir={tmp}/" + "x" * 300], "over the file system's limit of",
     "none", None),
    (["--workdir={tmp}/" + "/".join(["y" * 200] * 25)], "exceeds the limit of",
     "none", None),
    ([C + "data.name=image_folder",
      C + "data.root={non_utf8}"], "not valid UTF-8", "plain", None),
    # Weights that are not what they seem, found at load.
    ([C + "init.checkpoint={nan_safetensors}"],
     "blocks.0.attn.qkv.weight holds 768 NaN or infinite", "plain", None),
    (["--mode=eval", C + "init.checkpoint={nan_safetensors}"],
     "NaN or infinite", "plain", None),
    ([C + "init.checkpoint={int_safetensors}"],
     "int32 values, not floating-point weights", "plain", None),
    (["--mode=eval"], "holds 160 NaN or infinite values in head.kernel",
     "nan_run", None),
    (["--mode=export"], "NaN or infinite values in head.kernel", "nan_run",
     None),
    ([C + "init.checkpoint=/dev/null"], "is not a regular file", "plain", None),
    (["--mode=eval",
      C + "init.checkpoint=/dev/null"], "is not a regular file", "plain", None),
    # Known early, said early.
    ([
        C + "data.name=image_folder", C + "data.root={three}",
        C + "eval.attacks=('clean','aa')"
    ], "has 3 classes, too few", "plain", None),
    ([
        "--mode=eval", C + "data.name=image_folder", C + "data.root={three}",
        C + "eval.attacks=('clean','aa')", C + "init.checkpoint={wide_ckpt}"
    ], "has 3 classes, too few", "plain", None),
    ([C + "eval.attacks=('clean','pgd20','pgd20')"], "lists 'pgd20' twice",
     "plain", None),
    (["--mode=eval"], "is still training", "corrupt_locked", None),
    (["--config=configs/imagenet.py:model=deit_smal_patch16_224"],
     "unknown model 'deit_smal_patch16_224': did you mean "
     "deit_small_patch16_224", "plain", None),
    (["--config=configs/cifar10.py:model=vit_base_patch16_22,pretrained=in21k"],
     "unknown model 'vit_base_patch16_22'", "plain", None),
    # Another tool's files in a run's workdir.
    (["--mode=report"], "metrics.json is not shaped", "foreign_metrics", None),
    (["--mode=report"], "robustness.json is not shaped", "foreign_robustness",
     None),
    (["--mode=report"], "config.json is not shaped", "foreign_config", None),
    # -- report mode
    (["--mode=report"], "metrics.json cannot be read", "report", None),
    (["--mode=report", "--report_dir={a_file}"], "is a file", "trained", None),
    (["--mode=report",
      "--workdirs={tmp}/no_such_run"], "does not exist", "none", None),
]


def _snapshot(path):
  """Every file's bytes (hashed) and every entry's mtime under `path`."""
  if os.path.isfile(path):
    return {"": (open(path, "rb").read(), os.stat(path).st_mtime_ns)}
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      digest = None
      if os.path.isfile(full):
        with open(full, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(full, path)] = (digest, os.stat(full).st_mtime_ns)
  return out


def _snapshots(workdir):
  """`_snapshot` of the workdir and of what its links point to outside it
  (the siblings named `<workdir>_...`)."""
  return {
      str(p): _snapshot(p) for p in [
          workdir, *(workdir.parent.glob(f"{workdir.name}_*") if workdir.parent.
                     is_dir() else [])
      ]
  }


def _run_main(args, workdir=None, env=None):
  env = dict(os.environ, JAX_LOG_COMPILES="1", **(env or {}))
  workdir_flag = [f"--workdir={workdir}"] if workdir else []
  return subprocess.run(
      [sys.executable, "main.py", *workdir_flag, *TINY, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env)


def _run_many(cases, tmp):
  """[{rc, stdout, stderr}] of `main.py` on each (argv, env) case."""
  cases_path, results_path = tmp / "cases.json", tmp / "results.json"
  cases_path.write_text(
      json.dumps([{
          "argv": argv,
          "env": env
      } for argv, env in cases]))
  proc = subprocess.run([
      sys.executable, "tests/_main_runner.py",
      str(cases_path),
      str(results_path)
  ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=900,
                        env=dict(os.environ, JAX_LOG_COMPILES="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(results_path.read_text())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  proc = _run_main([], workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def _make_workdir(kind, path, trained_run):
  if kind == "plain":
    (path / "checkpoints").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
  elif kind == "file":
    path.write_text("I am a file")
  elif kind == "under_file":
    path.write_text("I am a file")
    return path / "run"
  elif kind == "foreign":
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "thesis.tex").write_text("years of work")
  elif kind in ("trained", "trained_no_json", "locked", "report", "corrupt",
                "corrupt_locked"):
    shutil.copytree(trained_run, path)
    if kind in ("corrupt",
                "corrupt_locked"):  # every array file of every checkpoint
      for root, _, names in os.walk(path / "checkpoints"):
        for name in names:
          if os.sep + "d" in root:
            with open(os.path.join(root, name), "wb") as f:
              f.write(b"garbage")
    if kind == "trained_no_json":
      os.remove(path / "config.json")
    if kind == "report":
      (path / "metrics.json").write_text('{"clean_acc": 0.')
  elif kind in _THIRD_ROUND_KINDS:
    shutil.copytree(trained_run, path)
    _THIRD_ROUND_KINDS[kind](path)
  return path


def _link_away(path, name):
  """Replaces `path/name` by a symbolic link to a folder outside `path`."""
  target = path.parent / f"{path.name}_outside_{name}"
  target.mkdir()
  if (path / name).is_dir():
    shutil.copytree(path / name, target, dirs_exist_ok=True)
    shutil.rmtree(path / name)
  elif (path / name).exists():
    os.remove(path / name)
  os.symlink(target, path / name)


def _plot_link(path):
  victim = path.parent / f"{path.name}_victim.txt"
  victim.write_text("not a plot")
  os.remove(path / "learning_curves.png")
  os.symlink(victim, path / "learning_curves.png")


def _nan_run(path):
  """The newest checkpoint rewritten with a NaN head."""
  from tests import _tiny
  from vitat_jax import checkpointing
  step, state = _tiny.newest_checkpoint(str(path))
  meta = json.loads(
      (path / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  kernel = np.asarray(state["params"]["head"]["kernel"])
  state["params"]["head"]["kernel"] = np.full_like(kernel, np.nan)
  shutil.rmtree(path / "checkpoints" / str(step))
  mngr = checkpointing.checkpoint_manager(str(path))
  checkpointing.save_checkpoint(mngr, step, state, meta)
  mngr.wait_until_finished()
  mngr.close()


def _write(name, text):
  return lambda path: (path / name).write_text(text)


_THIRD_ROUND_KINDS = {
    "export_link":
        lambda path: _link_away(path, "export"),
    "card_dir":
        lambda path: (path / "export" / "model_card.json").mkdir(parents=True),
    "checkpoints_link":
        lambda path: _link_away(path, "checkpoints"),
    "tensorboard_link":
        lambda path: _link_away(path, "tensorboard"),
    "adversarial_link":
        lambda path: _link_away(path, "adversarial"),
    "adversarial_file":
        _write("adversarial", "in the way"),
    "plot_link":
        _plot_link,
    "nan_run":
        _nan_run,
    # Another tool's metrics.json; a robustness.json and a config.json of
    # the wrong shape.
    "foreign_metrics":
        lambda path: (os.remove(path / "robustness.json"),
                      (path / "metrics.json").write_text('{"clean_acc": 0.9}')),
    "foreign_robustness":
        _write("robustness.json", '{"results": [1, 2]}'),
    "foreign_config":
        _write("config.json", '{"model": "vit"}'),
}


def test_bad_inputs_fail_in_one_line_before_any_compilation(
    tmp_path, trained_run):
  assert len(CASES) >= 80
  assert len({(tuple(a), k) for a, _, k, _ in CASES}) == len(CASES)
  files = _files(tmp_path)
  jobs, locks = [], []
  for index, (flags, fragment, kind, env) in enumerate(CASES):
    workdir = _make_workdir(kind, tmp_path / f"workdir_{index}", trained_run)
    flags = [f.format(**files) for f in flags]
    if kind in ("locked", "corrupt_locked"):  # a live run holds the lock
      fd = os.open(workdir / "run.lock", os.O_RDWR | os.O_CREAT)
      os.write(fd, f"PID {os.getpid()} on host testhost\n".encode())
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locks.append(fd)
    argv = flags if kind == "none" else [f"--workdir={workdir}", *flags]
    if not any(f.startswith("--config=") for f in flags):
      argv = [*TINY, *argv]
    jobs.append((argv, fragment, env, workdir, _snapshots(workdir)))
  results = _run_many([(j[0], j[2]) for j in jobs], tmp_path)
  for fd in locks:
    os.close(fd)
  failures = []
  for (argv, fragment, _, workdir, before), result in zip(jobs, results):
    stderr = result["stderr"]
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    problems = []
    if result["rc"] != 2:
      problems.append(f"exit code {result['rc']}")
    if len(errors) != 1 or fragment not in errors[0]:
      problems.append(f"error lines {errors}, want one with {fragment!r}")
    if "Traceback" in stderr or "Event loop is closed" in stderr:
      problems.append("a traceback")
    if "Compiling" in stderr:
      problems.append("compiled something")
    if _snapshots(workdir) != before:
      problems.append("changed the workdir")
    if problems:
      failures.append(f"{argv[len(TINY):]}: {'; '.join(problems)}\n"
                      f"{stderr[-800:]}")
  assert not failures, "\n\n".join(failures)
  # The pickle payload never ran.
  assert not os.path.exists(files["marker"])


def test_a_workdir_with_another_run_is_refused_untouched(tmp_path, trained_run):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  before = _snapshot(workdir)
  proc = _run_main(["--config.attack.steps=2"], workdir)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "different config" in errors[0]
  assert "--overwrite" in errors[0] and "attack.steps" in errors[0]
  assert _snapshot(workdir) == before


def test_help_explains_config_fields_and_exits_0():
  proc = subprocess.run([sys.executable, "main.py", "--help"],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--config.<section>.<field>=value" in proc.stdout
  assert "configs/default.py" in proc.stdout
  assert "--workdir" in proc.stdout and "Traceback" not in proc.stderr


def test_configs_never_turn_pickle_loading_on(tmp_path):
  from configs import cifar10
  (tmp_path / "deit_tiny_patch16_224.pth").write_bytes(b"pickle payload")
  config = cifar10.get_config(
      f"model=deit_tiny_patch16_224,pretrained=in1k,pretrained_dir={tmp_path}")
  assert config.init.checkpoint.endswith(".pth")
  assert config.init.allow_pickle is False


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
  from PIL import Image
  from vitat_jax.data import decode
  path = str(tmp_path / "grey16.png")
  Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(path)
  assert Image.open(path).mode == "I;16"
  with Image.open(path) as image:
    rgb = decode._rgb(image)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(rgb),
                                np.full((8, 8, 3), 128, np.uint8))


def test_only_the_data_cache_may_change_between_a_run_and_its_resumption(
    tmp_path, trained_run):
  import ml_collections
  from vitat_jax import workdir as workdir_lib
  from vitat_jax.errors import UserError
  config = ml_collections.ConfigDict(
      json.loads((trained_run / "config.json").read_text()))
  config.data.cache_dir = str(tmp_path / "cache")
  config.eval.num_examples = 7
  workdir_lib.check_same_config(config, str(trained_run))  # no error
  config.data.train_split = "other"
  with pytest.raises(UserError, match=r"differs in: data\.train_split\)"):
    workdir_lib.check_same_config(config, str(trained_run))


def test_eval_on_a_workdir_that_cannot_be_written_still_gives_the_table(
    tmp_path, trained_run, monkeypatch):
  import errno
  from vitat_jax import eval_only
  from vitat_jax import workdir as workdir_lib
  from tests import _tiny

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  before = _snapshot(workdir)
  monkeypatch.setattr(workdir_lib, "write_json", read_only)
  monkeypatch.setattr(workdir_lib, "write_text", read_only)
  cli = _tiny.config(**{"eval.attacks": ("clean",), "eval.num_examples": 32})
  result = eval_only.evaluate_checkpoint(cli, str(workdir))
  assert "clean" in result["table"] and "Read-only" in result["write_error"]
  assert _snapshot(workdir) == before


# -- the third round (issue 26 item 8): what the command-line table above
# cannot reach cheaply, in-process.


def test_the_report_of_runs_with_no_common_parent_is_not_written_at_the_root(
    tmp_path, monkeypatch):
  from vitat_jax import report
  monkeypatch.chdir(tmp_path)
  out_dir = report.default_report_dir(["/tmp/run_a", "/var/run_b"])
  assert out_dir == str(tmp_path / "comparison")
  assert report.default_report_dir(["/x/runs/a",
                                    "/x/runs/b"]) == "/x/runs/comparison"


def test_a_run_checkpoint_of_another_class_count_gets_no_new_head(trained_run):
  from vitat_jax import checkpointing
  from vitat_jax import workdir as workdir_lib
  from vitat_jax.errors import UserError
  from tests import _tiny
  model = _tiny.model(num_classes=3)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), np.float32))
  step = workdir_lib.saved_steps(str(trained_run))[0]
  with pytest.raises(UserError,
                     match="has a head of 10 classes and the data now has 3"):
    checkpointing._check_saved_shapes(  # pylint: disable=protected-access
        str(trained_run), step, abstract["params"])


def test_adversarial_examples_that_cannot_be_saved_cost_one_line_not_the_table(
    tmp_path, monkeypatch):
  import errno
  from absl import logging as absl_logging
  from vitat_jax import results
  from vitat_jax import workdir as workdir_lib
  from vitat_jax.errors import UserError
  saved = {
      "apgd-ce": {
          "indices": [np.arange(2)],
          "images": [np.zeros((2, 8, 8, 3), np.float32)],
          "labels": [np.zeros(2, np.int32)]
      }
  }
  warnings = []
  monkeypatch.setattr(absl_logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  # A file in the way of adversarial/: nothing raised, one warning.
  (tmp_path / "adversarial").write_text("in the way")
  assert results.write_adversarial(str(tmp_path), saved, eps=0.03,
                                   norm="Linf") == []
  assert len(warnings) == 1 and "not saved" in warnings[0]
  assert (tmp_path / "adversarial").read_text() == "in the way"

  # A read-only workdir: refused before the evaluation (setup.prepare's
  # check), and AutoAttack's log lost in one warning, not a traceback.
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(os, "access", lambda *a, **k: False)
  with pytest.raises(UserError, match="is not writable .eval.save_adversarial"):
    workdir_lib.check_output(str(tmp_path / "run"),
                             "adversarial",
                             folder=True,
                             why="eval.save_adversarial",
                             writable=True)
  monkeypatch.setattr(workdir_lib, "write_text", read_only)
  run = {
      "version": "standard",
      "robust_accuracy": {
          "clean": 1.0,
          "apgd-ce": 0.5
      },
      "seconds": {
          "apgd-ce": 1.0
      },
      "broken": {
          "apgd-ce": 1
      },
      "attacked": {
          "apgd-ce": 2
      },
      "perturbation": {
          "max": 0.03,
          "nan": False,
          "max_value": 1.0,
          "min_value": 0.0
      }
  }
  results.write_autoattack_log(str(tmp_path), run, "Linf")
  assert len(warnings) == 2 and "Read-only" in warnings[1]


def test_lost_storage_ends_in_one_line():
  # (A killed loader worker: tests/data/test_pipeline.py.)
  import logging
  import aiohttp
  from vitat_jax import cli
  # A GCS server gone: aiohttp's error under gcsfs's, found in the chain;
  # gcsfs's logged retries are kept out of the log (the caller says it).
  try:
    try:
      raise ConnectionRefusedError(111, "Connect call failed")
    except OSError as e:
      raise RuntimeError("gcsfs gave up") from e
  except RuntimeError as e:
    chained = e
  assert "Connect call failed" in cli.storage_unreachable(chained)
  assert cli.storage_unreachable(ValueError("bad value")) is None
  assert aiohttp.ClientConnectorError.__name__ in cli._UNREACHABLE_CLASSES  # pylint: disable=protected-access
  record = logging.LogRecord("gcsfs", logging.ERROR, "retry.py", 1,
                             "_request out of retries", (),
                             (type(chained), chained, None))
  assert not cli.QuietLibraries().filter(record)


def test_a_failed_checkpoint_reads_sibling_tracebacks_are_kept_out():
  """An unreadable checkpoint's other failed array reads, printed by asyncio
  when it collects their tasks, are not shown (the first is reported in one
  line); asyncio's other reports are."""
  import logging
  from vitat_jax import cli
  read = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error reading'
                    ' "params.patch_embed.kernel/.zarray" in OCDBT database '
                    "[tensorstore_spec='{\"driver\":\"zarr\"}']")
  record = lambda name, msg, error: logging.LogRecord(
      name, logging.ERROR, "base_events.py", 1, msg, (),
      (type(error), error, None))
  quiet = cli.QuietLibraries()
  assert not quiet.filter(
      record("asyncio", "Task exception was never retrieved", read))
  assert not quiet.filter(
      record("asyncio", "Future exception was never retrieved", read))
  assert quiet.filter(
      record("asyncio", "Task exception was never retrieved",
             ValueError("a bug in a callback")))
  assert quiet.filter(record("vitat_jax", "a run's own error", read))


def test_hosts_given_different_num_processes_stop_in_one_line(tmp_path):
  """Process 0 expecting 3 processes where 2 come: both stop within the
  --coordinator_timeout in one line; process 0 expecting 2 and process 1
  expecting 3 (the join succeeds): both refused at once, naming
  --num_processes."""
  import socket

  def port():
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]

  def start(address, num_processes, process_id, workdir):
    return subprocess.Popen([
        sys.executable, "main.py", f"--workdir={workdir}", *TINY,
        f"--coordinator_address={address}", f"--num_processes={num_processes}",
        f"--process_id={process_id}", "--coordinator_timeout=4"
    ],
                            cwd=REPO,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True)

  def errors(stderr):
    return [l for l in stderr.splitlines() if l.startswith("error:")]

  address = f"127.0.0.1:{port()}"
  procs = [
      start(address, 3, 0, tmp_path / "a"),
      start(address, 2, 1, tmp_path / "a")
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for proc, (_, stderr) in zip(procs, outs):
    assert proc.returncode == 2, stderr[-2000:]
    assert len(errors(stderr)) == 1, stderr[-2000:]
    assert "not every process joined within 4 s" in errors(stderr)[0]
    assert "Traceback" not in stderr and "Check failure" not in stderr

  address = f"127.0.0.1:{port()}"
  procs = [
      start(address, 2, 0, tmp_path / "b"),
      start(address, 3, 1, tmp_path / "b")
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for proc, (_, stderr), (here, there) in zip(procs, outs, ((2, 3), (3, 2))):
    assert proc.returncode == 2, stderr[-2000:]
    assert len(errors(stderr)) == 1, stderr[-2000:]
    assert (f"--num_processes={here} here, but {there} on another host"
            in errors(stderr)[0])
    assert "Traceback" not in stderr

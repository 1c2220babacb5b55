"""The training loop end to end on digits: one compile, resume, clear errors."""

import json
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import _tiny
from vitat_jax import checkpointing
from vitat_jax import state as state_lib
from vitat_jax import runs
from vitat_jax import train
from vitat_jax import train_step as train_step_lib
from vitat_jax.errors import UserError


def _final_params(workdir):
  mngr = checkpointing.checkpoint_manager(workdir)
  restored = mngr.restore(
      mngr.latest_step(),
      args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state["params"], mngr.latest_step()


# Neither the usual 022 nor mkstemp's 0600: files must come out 0640.
RUN_UMASK = 0o027


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One uninterrupted run, with the train step traced at most once, under
  the umask `RUN_UMASK`."""
  workdir = str(tmp_path_factory.mktemp("run"))
  original = train_step_lib.make_train_step
  previous_umask = os.umask(RUN_UMASK)
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(
          train_step_lib, "make_train_step",
          lambda *a, **k: chex.assert_max_traces(original(*a, **k), n=1))
      result = train.train_and_evaluate(_tiny.config(), workdir)
  finally:
    os.umask(previous_umask)
  return workdir, result


def test_metrics_json_and_logs(finished_run):
  workdir, result = finished_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  for key in ("clean_acc", "pgd20_acc", "cw20_acc"):
    assert 0.0 <= metrics[key] <= 1.0
  # Robust accuracy can't exceed clean accuracy on the same images.
  assert metrics["pgd20_acc"] <= metrics["clean_acc"]
  assert metrics["num_eval_images"] == 64
  assert metrics["train_time_s"] > 0 and metrics["wall_time_s"] > 0
  assert metrics["steps"] == 20
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if "train_loss" in r]
  assert [r["step"] for r in train_records] == [5, 10, 15, 20]
  assert all(np.isfinite(r["train_loss"]) for r in train_records)
  # r(t) warms up over the first epoch (10 steps), then stays at 1.
  assert train_records[0]["train_r"] < 1.0 and train_records[-1][
      "train_r"] == 1.0
  epoch_records = [r for r in records if "test_clean_acc" in r]
  assert [r["epoch"] for r in epoch_records] == [1, 2]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["embed_dim"] == 16
  assert "pgd20" in result["table"] and "64 test images" in result["table"]


def test_resume_after_interruption_is_bitwise_identical(finished_run, tmp_path,
                                                        monkeypatch):
  reference_params, _ = _final_params(finished_run[0])
  workdir = str(tmp_path)
  real_save = checkpointing.save_checkpoint

  def save_then_die(mngr, step, state, meta=None):
    real_save(mngr, step, state, meta)
    mngr.wait_until_finished()
    raise KeyboardInterrupt(f"simulated preemption after step {step}")

  monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
  with pytest.raises(KeyboardInterrupt, match="after step 7"):
    train.train_and_evaluate(_tiny.config(), workdir)
  monkeypatch.setattr(checkpointing, "save_checkpoint", real_save)
  result = train.train_and_evaluate(_tiny.config(), workdir)
  assert result["resumed_from_step"] == 7
  params, step = _final_params(workdir)
  assert step == 20
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  with open(os.path.join(finished_run[0], "metrics.json")) as f:
    reference = json.load(f)
  for key in ("clean_acc", "pgd20_acc", "cw20_acc"):
    assert result[key] == reference[key]


def test_a_different_config_in_the_same_workdir_is_refused(finished_run):
  with pytest.raises(UserError, match="differs in: attack") as info:
    train.train_and_evaluate(_tiny.config(**{"attack.steps": 3}),
                             finished_run[0])
  assert "\n" not in str(info.value)


def test_natural_training_is_one_switch(tmp_path):
  result = train.train_and_evaluate(
      _tiny.config(method="natural",
                   epochs=1.0,
                   **{"eval.attacks": ("clean", "pgd20")}), str(tmp_path))
  assert result["method"] == "natural"
  assert 0.0 <= result["pgd20_acc"] <= result["clean_acc"]


@pytest.mark.parametrize("overrides, fragment", [
    ({
        "model.name": "vit_tiny_patch16_22"
    }, "unknown model"),
    ({
        "model.patch_size": 3
    }, "does not divide"),
    ({
        "attack.eps": 0.0
    }, "eps=0.0 must be in"),
    ({
        "attack.alpha": 16 / 255
    }, "cannot exceed the radius"),
    ({
        "attack.steps": 0
    }, "steps=0"),
    ({
        "method": "fgsm"
    }, "unknown method"),
    ({
        "data.name": "image_folder",
        "data.root": "/nonexistent/cifar"
    }, "does not exist"),
    ({
        "data.name": "imagenet21k"
    }, "unknown dataset"),
    ({
        "eval.attacks": ("clean", "pgd")
    }, "unknown evaluation attack"),
    ({
        "tricks.warmup_epochs": 5.0,
        "tricks.ard": True
    }, "warmup_epochs=5.0"),
])
def test_bad_config_fails_in_one_line_before_compiling(overrides, fragment,
                                                       tmp_path, monkeypatch):

  def no_compile(*args, **kwargs):
    raise AssertionError("reached compilation despite a bad config")

  monkeypatch.setattr(train_step_lib, "make_train_step", no_compile)
  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(UserError, match=fragment) as info:
    train.train_and_evaluate(_tiny.config(**overrides), str(tmp_path / "w"))
  assert "\n" not in str(info.value)


def test_empty_image_folder_fails_before_compiling(tmp_path, monkeypatch):
  for split in ("train", "test"):
    (tmp_path / "data" / split / "cat").mkdir(parents=True)
  monkeypatch.setattr(train_step_lib, "make_train_step", lambda *a, **k: 1 / 0)
  with pytest.raises(UserError, match="images under") as info:
    train.train_and_evaluate(
        _tiny.config(**{
            "data.name": "image_folder",
            "data.root": str(tmp_path / "data")
        }), str(tmp_path / "w"))
  assert "\n" not in str(info.value)


def test_training_starts_from_a_resampled_pretrained_checkpoint(
    tmp_path, monkeypatch):
  from vitat_jax import pretrained
  from vitat_jax import models
  # A "pre-trained" model at 16 px with 7 classes; the run uses 8 px, 10.
  source = models.create("deit_tiny_patch16_224",
                         num_classes=7,
                         img_size=16,
                         patch_size=4,
                         embed_dim=16,
                         depth=1,
                         num_heads=2)
  source_params = source.init(jax.random.key(3),
                              np.zeros((1, 16, 16, 3), np.float32))["params"]
  path = str(tmp_path / "pretrained.safetensors")
  pretrained.export_timm(source_params, source, path)
  loaded = {}
  real_load = pretrained.load

  def spy(*args, **kwargs):
    loaded["params"] = real_load(*args, **kwargs)
    return loaded["params"]

  monkeypatch.setattr(pretrained, "load", spy)
  result = train.train_and_evaluate(
      _tiny.config(epochs=1.0, **{"init.checkpoint": path}),
      str(tmp_path / "w"))
  assert 0.0 <= result["clean_acc"] <= 1.0
  params = loaded["params"]
  np.testing.assert_array_equal(
      params["blocks_0"]["attn"]["qkv"]["kernel"],
      source_params["blocks_0"]["attn"]["qkv"]["kernel"])
  assert params["pos_embed"].shape == (1, 2 * 2 + 1, 16)  # 4x4 grid -> 2x2
  assert params["head"]["kernel"].shape == (16, 10)  # new head
  # --mode=eval evaluates the run's own weights, not the file it started
  # from, whether the command leaves init.checkpoint out (the run's config
  # is taken) or names the same file again (a paper config does).
  from vitat_jax import eval_only  # pylint: disable=g-import-not-at-top
  for init in ({}, {"init.checkpoint": path}):
    evaluated = eval_only.evaluate_checkpoint(
        _tiny.config(epochs=1.0, **{
            "eval.attacks": ("clean",),
            **init
        }), str(tmp_path / "w"))
    assert evaluated["checkpoint"] != path
    assert evaluated["clean_acc"] == result["clean_acc"]


def test_missing_or_mismatched_checkpoint_is_a_one_line_error(tmp_path):
  with pytest.raises(UserError, match="does not exist") as info:
    train.train_and_evaluate(
        _tiny.config(**{"init.checkpoint": str(tmp_path / "nope.safetensors")}),
        str(tmp_path / "w"))
  assert "\n" not in str(info.value)
  from vitat_jax import pretrained
  from vitat_jax import models
  wider = models.create("deit_tiny_patch16_224",
                        num_classes=10,
                        img_size=8,
                        patch_size=4,
                        embed_dim=32,
                        depth=1,
                        num_heads=2)
  path = str(tmp_path / "wider.safetensors")
  pretrained.export_timm(
      wider.init(jax.random.key(0), np.zeros(
          (1, 8, 8, 3), np.float32))["params"], wider, path)
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(_tiny.config(**{"init.checkpoint": path}),
                             str(tmp_path / "w2"))
  assert "\n" not in str(info.value)


def test_every_file_a_run_writes_has_the_umasks_mode(finished_run):
  workdir, _ = finished_run
  modes = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      modes[os.path.relpath(path, workdir)] = os.stat(path).st_mode & 0o777
  for name in ("config.json", "metrics.json", "robustness.json",
               "robustness.md", "metrics.jsonl", "learning_curves.png"):
    assert name in modes
  wanted = 0o666 & ~RUN_UMASK
  assert {p: oct(m) for p, m in modes.items() if m != wanted} == {}


def test_the_report_says_which_test_images_were_evaluated(finished_run):
  workdir, result = finished_run
  text = ("stratified subset of 64 of 360 test images, 6-7 per class, "
          "seed 0")
  assert result["eval_subset"] == text
  with open(os.path.join(workdir, "robustness.json")) as f:
    assert json.load(f)["eval_subset"] == text
  with open(os.path.join(workdir, "robustness.md")) as f:
    assert f"Images: {text}." in f.read()


def test_a_real_run_leaves_metrics_tensorboard_and_plots(finished_run):
  from PIL import Image
  from vitat_jax import metric_writers
  workdir, _ = finished_run
  records = runs.read_jsonl(workdir)
  train_records = [r for r in records if "train_loss" in r]
  assert [r["step"] for r in train_records] == [5, 10, 15, 20]
  for record in records:
    for key, value in record.items():
      if isinstance(value, float):
        assert np.isfinite(value), (key, record)
  scalars = metric_writers.read_tensorboard_scalars(workdir)
  # Tags are grouped as train/..., test/..., final/...
  assert [step for step, _ in scalars["train/loss"]] == [5, 10, 15, 20]
  assert len(scalars["test/pgd20_acc"]) == 2  # one per epoch
  assert "final/pgd20_acc" in scalars
  for name in ("learning_curves.png", "schedules.png", "robustness.png"):
    path = os.path.join(workdir, name)
    assert os.path.getsize(path) > 10_000, name
    with Image.open(path) as image:
      assert image.size[0] >= 600 and image.size[1] >= 400
  for name in ("robustness.json", "robustness.md"):
    assert os.path.exists(os.path.join(workdir, name))


def _as_written_before_the_tricks_section(config_dict):
  """A config as runs saved it before `tricks`, `optim.nesterov/b1/b2`,
  `optim.milestones(_from)` and `model.weight_init` existed."""
  old = json.loads(json.dumps(config_dict))
  tricks = old.pop("tricks")
  old.update(ard=tricks["ard"],
             prm=tricks["prm"],
             warmup_epochs=tricks["warmup_epochs"],
             drop_rate=tricks["final_keep_rate"])
  for field in ("nesterov", "b1", "b2", "milestones", "milestones_from"):
    del old["optim"][field]
  # Those runs' PRM grid was the model's patch grid, their init Xavier's.
  assert tricks["prm_patch_size"] == old["model"]["patch_size"]
  assert old["model"].pop("weight_init") == "xavier_uniform"
  return old


def test_a_run_saved_before_the_config_changes_resumes_and_evaluates(
    finished_run, tmp_path):
  import shutil
  from vitat_jax import eval_only
  workdir = str(tmp_path / "old")
  shutil.copytree(finished_run[0], workdir)
  step_meta = os.path.join(workdir, "checkpoints", "20", "meta", "metadata")
  for path, key in ((step_meta, "config"),
                    (os.path.join(workdir, "config.json"), None)):
    with open(path) as f:
      saved = json.load(f)
    if key:
      saved[key] = _as_written_before_the_tricks_section(saved[key])
    else:
      saved = _as_written_before_the_tricks_section(saved)
    with open(path, "w") as f:
      json.dump(saved, f)
  # The same command resumes (here: the finished run is evaluated again)...
  again = train.train_and_evaluate(_tiny.config(), workdir)
  assert again["resumed_from_step"] == 20
  assert again["clean_acc"] == finished_run[1]["clean_acc"]
  # ... and --mode=eval, with a command config of today, evaluates it.
  evaluated = eval_only.evaluate_checkpoint(_tiny.config(), workdir)
  assert evaluated["clean_acc"] == finished_run[1]["clean_acc"]


def test_wall_clock_checkpoints_land_on_log_steps(tmp_path):
  from vitat_jax import workdir as workdir_lib
  workdir = str(tmp_path)
  # Minutes so short that every log step is due; steps so many that none is.
  train.train_and_evaluate(
      _tiny.config(
          **{
              "checkpoint_every_minutes": 1e-9,
              "checkpoint_every_steps": 1000,
              "keep_checkpoints": 10,
              "eval.epoch_num_examples": 0,
              "eval.attacks": ("clean",),
              "checkpoint_every_epochs": 0
          }), workdir)
  assert workdir_lib.saved_steps(workdir) == [20, 15, 10, 5]
  # By epochs alone: the end of each 10-step epoch.
  workdir = str(tmp_path / "by_epochs")
  train.train_and_evaluate(
      _tiny.config(
          **{
              "checkpoint_every_minutes": 0,
              "checkpoint_every_steps": 1000,
              "keep_checkpoints": 10,
              "eval.epoch_num_examples": 0,
              "eval.attacks": ("clean",),
              "checkpoint_every_epochs": 1
          }), workdir)
  assert workdir_lib.saved_steps(workdir) == [20, 10]


def test_auto_compute_dtype_is_bfloat16_on_accelerators_and_logged(monkeypatch):
  from vitat_jax import parallel
  lines = []
  monkeypatch.setattr(parallel.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  assert parallel.compute_dtype_for("auto", "gpu") == "bfloat16"
  assert parallel.compute_dtype_for("auto", "tpu") == "bfloat16"
  assert parallel.compute_dtype_for("auto", "cpu") == "float32"
  assert parallel.compute_dtype_for("float16", "gpu") == "float16"
  assert len(lines) == 3, lines
  assert lines[0].startswith("compute_dtype auto: bfloat16 on gpu"), lines
  assert lines[2].startswith("compute_dtype auto: float32 on cpu"), lines


def test_the_compilation_cache_is_configured_and_reported():
  from vitat_jax import compilation
  # A directory configured outside the config (as tests/conftest.py does)
  # wins; an empty setting leaves the cache off.
  assert compilation.choose_directory("/elsewhere", "~/c") == "/elsewhere"
  assert compilation.choose_directory(None, "~/c") == os.path.expanduser("~/c")
  assert compilation.choose_directory(None, "") is None
  assert compilation.enable_cache("") == jax.config.jax_compilation_cache_dir
  hits = compilation.cache_hits()
  assert "cache off" in compilation.describe(hits, None)
  assert "kept in the compilation cache in /c" in compilation.describe(
      hits, "/c")
  compilation._count("/jax/compilation_cache/cache_hits")  # pylint: disable=protected-access
  assert compilation.describe(
      hits, "/c") == ("loaded from the compilation cache in /c")


def test_a_step_that_cannot_fit_the_device_stops_before_it_runs(tmp_path):
  workdir = str(tmp_path)
  # 200 KiB per device: more than the tiny step's state (~40 KB), less
  # than its temporaries (~320 KB).
  config = _tiny.config(**{"device_memory_gb": 200 * 2**-20})
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "\n" not in message and "GB per device" in message
  assert "--config.accum_steps=" in message, message
  assert "--config.model.remat=True" in message
  # Nothing trained: no checkpoint, no metrics.
  assert not checkpointing.checkpoint_manager(workdir).all_steps()
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))

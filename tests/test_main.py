"""The command line: a tiny run end to end, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.data.image_size=8", "--config.data.train_examples=128",
    "--config.model.embed_dim=16", "--config.model.depth=1",
    "--config.model.num_heads=2", "--config.epochs=1",
    "--config.tricks.warmup_epochs=1", "--config.attack.steps=1",
    "--config.eval.num_examples=32", "--config.eval.batch_size=32",
    "--config.batch_size=32"
]


def _run(*args):
  return subprocess.run([sys.executable, "main.py", *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = _run(f"--workdir={workdir}", *TINY)
  return workdir, proc


def test_main_trains_evaluates_and_writes_the_workdir(trained):
  tmp_path, proc = trained
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "pgd20" in proc.stdout and "cw20" in proc.stdout
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  assert {"clean_acc", "pgd20_acc", "num_eval_images"} <= set(metrics)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["depth"] == 1
  # The run names its real shape, not only the registry name it came from.
  shape = ("deit_tiny_patch16_224 (width 16, depth 1, heads 2, patch 4, "
           "image size 8 px)")
  assert f"model {shape}: 0.00M parameters" in proc.stderr
  assert metrics["model"] == shape
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


def test_eval_mode_reproduces_the_final_evaluation_and_adds_autoattack(trained):
  workdir, _ = trained
  with open(workdir / "metrics.json") as f:
    trained_metrics = json.load(f)
  proc = _run("--mode=eval", f"--workdir={workdir}",
              "--config.eval.num_examples=32", "--config.eval.batch_size=32",
              "--config.eval.attacks=('clean','pgd20','aa')",
              "--config.eval.save_adversarial=True")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(workdir / "robustness.json") as f:
    robustness = json.load(f)
  # Same params, images and keys as the end-of-training evaluation.
  assert robustness["clean_acc"] == trained_metrics["clean_acc"]
  assert robustness["pgd20_acc"] == trained_metrics["pgd20_acc"]
  assert robustness["aa_acc"] <= robustness["clean_acc"]
  log = robustness["autoattack"]
  assert list(log["robust_accuracy"]) == [
      "clean", "apgd-ce", "apgd-t", "fab-t", "square"
  ]
  assert "zero_gradient_points" in log["checks"]
  assert "aa" in proc.stdout
  # fra31's log format, and the broken points' images per attack.
  lines = (workdir / "log.txt").read_text().splitlines()
  assert lines[0] == ("using standard version including apgd-ce, apgd-t, "
                      "fab-t, square.")
  assert lines[1] == f"initial accuracy: {robustness['clean_acc']:.2%}"
  assert lines[-1] == f"robust accuracy: {robustness['aa_acc']:.2%}"
  assert sum(l.startswith("robust accuracy after ") for l in lines) == 4
  import numpy as np
  broken = 0
  for name in log["robust_accuracy"]:
    if name != "clean":
      with np.load(workdir / "adversarial" / f"{name}.npz") as saved:
        assert len(saved["indices"]) == len(
            saved["images"]) == log["broken"][name]
        broken += len(saved["indices"])
  assert broken == round(32 * (robustness["clean_acc"] - robustness["aa_acc"]))


def test_bad_autoattack_version_fails_before_any_work(trained):
  workdir, _ = trained
  proc = _run("--mode=eval", f"--workdir={workdir}",
              "--config.eval.attacks=('aa',)",
              "--config.eval.autoattack.version=fast")
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "unknown AutoAttack version" in errors[0]


def test_eval_mode_on_an_exported_checkpoint_gives_the_same_numbers(
    trained, tmp_path):
  from vitat_jax import pretrained
  from vitat_jax import state as state_lib
  from vitat_jax.state import build_model
  from vitat_jax import checkpointing
  import ml_collections
  import orbax.checkpoint as ocp
  workdir, _ = trained
  with open(workdir / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))
  mngr = checkpointing.checkpoint_manager(str(workdir))
  state = mngr.restore(
      mngr.latest_step(),
      args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  from vitat_jax import data
  model = build_model(config, data.load(config.data))
  exported = str(tmp_path / "robust.safetensors")
  pretrained.export_timm(state["params"], model, exported)
  # No model card beside the file: the digits' normalisation is stated
  # (else timm's for deit_tiny_patch16_224, ImageNet's, would be used).
  proc = _run("--mode=eval", f"--workdir={tmp_path}", *TINY,
              f"--config.init.checkpoint={exported}",
              "--config.data.mean=(0.5, 0.5, 0.5)",
              "--config.data.std=(0.5, 0.5, 0.5)",
              "--config.eval.attacks=('clean','pgd20')")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "robustness.json") as f:
    robustness = json.load(f)
  with open(workdir / "metrics.json") as f:
    trained_metrics = json.load(f)
  assert robustness["clean_acc"] == trained_metrics["clean_acc"]
  assert robustness["pgd20_acc"] == trained_metrics["pgd20_acc"]


def test_log_stays_short_and_has_no_progress_bar_off_a_terminal(trained):
  _, proc = trained
  assert proc.returncode == 0
  # One epoch here: a handful of log lines, no progress-bar redraws.
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) <= 12, proc.stderr
  assert "it/s" not in proc.stderr and "\r" not in proc.stderr


def test_report_mode_compares_runs_with_the_numbers_of_each(trained, tmp_path):
  workdir, _ = trained
  second = tmp_path / "second"
  proc = _run(f"--workdir={second}", *TINY, "--config.seed=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = tmp_path / "comparison"
  proc = _run("--mode=report", f"--workdirs={workdir},{second}",
              f"--report_dir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = (out / "comparison.md").read_text()
  for run in (workdir, second):
    with open(run / "metrics.json") as f:
      metrics = json.load(f)
    assert f"{100 * metrics['pgd20_acc']:.2f}" in table
    assert f"{100 * metrics['clean_acc']:.2f}" in table
  assert "seed" in table  # the config difference between the runs
  assert (out / "comparison.png").stat().st_size > 10_000


def test_export_mode_writes_weights_timm_loads_and_a_model_card(trained):
  import numpy as np
  import timm
  import torch
  from safetensors import torch as safetensors_torch
  from vitat_jax import checkpointing
  from vitat_jax import setup
  import ml_collections
  workdir, _ = trained
  proc = _run("--mode=export", f"--workdir={workdir}", *TINY)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "exported" in proc.stdout and "Compiling" not in proc.stderr
  card = json.loads((workdir / "export" / "model_card.json").read_text())
  assert card["timm"]["name"] == "deit_tiny_patch16_224"
  assert card["variant"].startswith("deit_tiny_patch16_224 (width 16, depth 1")
  assert card["num_params"] == sum(
      int(np.prod(v.shape)) for v in safetensors_torch.load_file(
          str(workdir / "export" / card["weights"])).values())
  assert card["timm"]["kwargs"]["num_classes"] == 10
  assert card["threat_model"] == {"norm": "Linf", "eps": 8 / 255}
  with open(workdir / "metrics.json") as f:
    trained_metrics = json.load(f)
  assert card["results"]["accuracy"]["pgd20"] == trained_metrics["pgd20_acc"]
  module = timm.create_model(card["timm"]["name"],
                             pretrained=False,
                             **card["timm"]["kwargs"]).eval()
  module.load_state_dict(safetensors_torch.load_file(
      str(workdir / "export" / card["weights"])),
                         strict=True)
  # The same logits as the run's own model on the same pixels.
  with open(workdir / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = setup.prepare(config, str(workdir), "export")
  model = run.model
  params, _ = checkpointing.restore_params(run)
  images = np.random.RandomState(0).rand(4, 8, 8, 3).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, images))
  inputs = (images -
            np.asarray(card["input"]["mean"], np.float32)) / np.asarray(
                card["input"]["std"], np.float32)
  with torch.no_grad():
    theirs = module(torch.from_numpy(inputs.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


def test_config_mode_prints_the_resolved_config_and_its_arguments():
  proc = _run("--mode=config", "--config=configs/cifar10.py:ard=True",
              "--config.optim.lr=0.05")
  assert proc.returncode == 0, proc.stderr[-2000:]
  config = json.loads(proc.stdout)
  assert config["optim"]["lr"] == 0.05 and config["tricks"]["ard"]
  assert config["data"]["image_size"] == 32  # the file's, not the default's
  assert "# Arguments of configs/cifar10.py" in proc.stderr
  assert "ard_prm" in proc.stderr


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "imagenette"])
def test_help_lists_the_arguments_of_each_paper_config(name):
  proc = _run("--help", f"--config=configs/{name}.py")
  assert proc.returncode == 0, proc.stderr[-2000:]
  module = __import__(f"configs.{name}", fromlist=["ARGS"])
  listed = proc.stdout.split(f"Arguments of configs/{name}.py")[1]
  for key in module.ARGS:
    assert f"\n  {key} " in listed, key
  # The table is what the file accepts: an unknown key names them all.
  with pytest.raises(ValueError, match=", ".join(module.ARGS)):
    module.get_config("bogus=1")

"""`vitat_jax.load_run` and `load_model`: a trained run's model from its
workdir or its export, with the run's own accuracy, without any data set."""

import json
import os
import shutil
import site
import subprocess
import sys

import numpy as np
import pytest

import vitat_jax
from tests import _tiny
from vitat_jax import data as data_lib
from vitat_jax import export
from vitat_jax import state as state_lib
from vitat_jax import train
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import subsets
from vitat_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUN = os.path.join(REPO, "tests", "fixtures", "run_2026_12_04")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run (2 epochs of 10 steps), its final metrics, and the images
  its final clean accuracy was measured on (`eval.num_examples`' stratified
  subset of the test split, as the Evaluator picks it)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _tiny.config(**{"eval.attacks": ("clean",)})
  train.train_and_evaluate(config, workdir)
  test = data_lib.load(config.data).test
  subset, _ = subsets.first_examples(test, config.eval.num_examples,
                                     config.data.subset_seed)
  images, labels = subset.get_batch(np.arange(len(subset)))
  metrics = workdir_lib.read_json(workdir_lib.path(workdir, "metrics.json"))
  return workdir, metrics, images.astype(np.float32) / 255.0, labels


def _accuracy(logits, labels):
  return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def test_load_run_reproduces_the_runs_clean_accuracy(trained):
  workdir, metrics, images, labels = trained
  run = vitat_jax.load_run(workdir)
  assert run.inputs_source == "recorded by the run"
  assert (run.inputs.image_size, run.inputs.num_classes) == (8, 10)
  assert run.source.endswith(f"step {metrics['steps']}")
  assert run.config.model.name == _tiny.ARCHITECTURE
  assert len(labels) == metrics["num_eval_images"] == 64
  assert _accuracy(run.logits_fn(images), labels) == metrics["clean_acc"]


_SCRIPT = """
import json, sys
import numpy as np
import vitat_jax
try:
  import configs  # the checkout's; an installed vitat_jax has none beside it
  sys.exit("configs importable: not a check from outside the checkout")
except ImportError:
  pass
batch = np.load("images.npz")
run = vitat_jax.load_run(sys.argv[1])
logits = np.asarray(run.logits_fn(batch["images"]))
print(json.dumps({"acc": float(np.mean(logits.argmax(-1) == batch["labels"])),
                  "file": vitat_jax.__file__}))
"""


def _installed_copy(tmp_path) -> str:
  """`pip install .` into a fresh venv: the package built from a copy of
  the checkout's packaging files (no build files land in the checkout),
  the dependencies, pip and setuptools seen from this environment (no
  index needed, and not the old setuptools a venv bundles). Returns the
  venv's python."""
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(REPO, name), source / name)
  shutil.copytree(os.path.join(REPO, "vitat_jax"),
                  source / "vitat_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                  str(venv)],
                 check=True,
                 timeout=120)
  # This environment's site-packages after the venv's own (a .pth file):
  # its pip, setuptools and the dependencies, never its vitat_jax (none is
  # installed there; the test checks which copy is imported).
  site_dir = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
  (site_dir /
   "parent_environment.pth").write_text("\n".join(site.getsitepackages()) +
                                        "\n")
  python = str(venv / "bin" / "python")
  install = subprocess.run([
      python, "-m", "pip", "install", "--quiet", "--no-deps",
      "--no-build-isolation", "--no-index",
      str(source)
  ],
                           capture_output=True,
                           text=True,
                           timeout=300,
                           check=False)
  assert install.returncode == 0, install.stderr[-2000:]
  return python


def test_load_run_from_a_script_outside_the_checkout(trained, tmp_path):
  workdir, metrics, images, labels = trained
  python = _installed_copy(tmp_path)
  np.savez(tmp_path / "images.npz", images=images, labels=labels)
  (tmp_path / "script.py").write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([python, "script.py", workdir],
                        cwd=tmp_path,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  outcome = json.loads(proc.stdout.strip().splitlines()[-1])
  # The installed copy, in the venv's site-packages, not the checkout's.
  assert outcome["file"].startswith(str(tmp_path / "venv"))
  assert "site-packages" in outcome["file"]
  assert outcome["acc"] == metrics["clean_acc"]


def test_load_model_of_the_export_gives_load_runs_logits(trained):
  workdir, _, images, _ = trained
  written = export.export_run(_tiny.config(), workdir)
  exported = vitat_jax.load_model(written["weights"])
  run = vitat_jax.load_run(workdir)
  assert exported.inputs == run.inputs
  assert exported.inputs_source.startswith("the model card")
  np.testing.assert_allclose(np.asarray(exported.logits_fn(images)),
                             np.asarray(run.logits_fn(images)),
                             rtol=1e-6,
                             atol=1e-6)


def test_load_model_without_a_card_needs_a_name(trained, tmp_path):
  workdir, _, _, _ = trained
  weights = workdir_lib.path(workdir_lib.path(workdir, export.EXPORT_DIR),
                             export.WEIGHTS)
  if not os.path.exists(weights):
    export.export_run(_tiny.config(), workdir)
  alone = tmp_path / "model.safetensors"
  shutil.copy(weights, alone)
  with pytest.raises(UserError, match="pass name="):
    vitat_jax.load_model(str(alone))
  # The tiny model is not timm's deit_tiny: its width is not in the name.
  with pytest.raises(UserError, match="not a checkpoint of"):
    vitat_jax.load_model(str(alone), name="deit_tiny_patch16_224")


def test_load_run_of_a_step_that_was_not_saved_lists_the_saved_ones(trained):
  workdir, _, _, _ = trained
  saved = sorted(workdir_lib.saved_steps(workdir))
  with pytest.raises(UserError, match=", ".join(map(str, saved))):
    vitat_jax.load_run(workdir, step=3)
  assert vitat_jax.load_run(workdir,
                            step=saved[0]).source.endswith(f"step {saved[0]}")


def test_a_run_that_recorded_no_inputs_has_them_inferred(tmp_path):
  workdir = str(tmp_path / "old")
  shutil.copytree(OLD_RUN, workdir)
  run = vitat_jax.load_run(workdir)
  assert run.inputs == state_lib.ModelInputs(8, 10, (0.5,) * 3, (0.5,) * 3)
  assert run.inputs_source.startswith("inferred")
  logits = run.logits_fn(np.zeros((2, 8, 8, 3), np.float32))
  assert logits.shape == (2, 10) and np.isfinite(logits).all()

"""Every config in configs/ (and each documented `:arg` choice) validates and
builds its model and optimiser state abstractly: no data, no training."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import studies
from vitat_jax import optim
from vitat_jax import state as state_lib
from vitat_jax import validate

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER_MODELS = ("vit_small_patch16_224_legacy", "vit_base_patch16_224",
                "vit_base_patch16_224_in21k", "deit_small_patch16_224",
                "deit_tiny_patch16_224", "convit_base", "convit_small",
                "convit_tiny")

CASES = [
    ("default", None),
    ("quickstart", None),
    ("cifar10", None),
    ("cifar10", "method=trades,ard_prm=True,pretrained=in1k"),
    ("cifar10", "method=mart,ard=True,prm=False"),
    ("cifar10", "method=natural,source=folder,root={tmp}"),
    ("cifar10", "model=vit_base_patch16_224,pretrained=in21k"),
    ("cifar10", "model=swin_tiny_patch4_window7_224,pretrained=scratch"),
    ("imagenette", "root={tmp}"),
    ("imagenette", "root={tmp},version=v2,method=trades,ard_prm=True,"
     "pretrained=in1k"),
    ("imagenet", None),
    ("imagenet", "model=swin_base_patch4_window7_224_in22k,ard_prm=True,"
     "accum_steps=4"),
    ("imagenet", "pretrained=scratch"),
    ("imagenet_modern", None),
    ("imagenet_modern", "model=swin_base_patch4_window7_224"),
    ("cifar10_modern", None),
    ("cifar10_modern", "extra={tmp}/gen.npz,fraction=0.5,method=at"),
] + [("cifar10", f"model={m},pretrained=in1k") for m in PAPER_MODELS] + [
    ("imagenette", f"root={{tmp}},model={m}") for m in PAPER_MODELS
] + [("studies", arm) for s in studies.STUDIES for arm in studies.study_args(s)]


def _load(name, arg, tmp_path):
  module = importlib.import_module(f"configs.{name}")
  if name in ("default", "quickstart"):
    return module.get_config()
  if name == "imagenet_modern":  # from scratch: no pretrained_dir
    return module.get_config(arg)
  arg = ",".join(
      filter(None,
             [(arg or "").format(tmp=tmp_path), f"pretrained_dir={tmp_path}"]))
  return module.get_config(arg)


def test_every_config_file_is_covered():
  files = {p.stem for p in CONFIG_DIR.glob("*.py")} - {"__init__", "common"}
  assert files == {name for name, _ in CASES}


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates_and_builds_a_train_state(name, arg, tmp_path):
  # Stand-ins for the pre-trained files the configs point at.
  for model in PAPER_MODELS + ("swin_base_patch4_window7_224_in22k",):
    (tmp_path / f"{model}.safetensors").touch()
  # A stand-in for generated extra data (configs/cifar10_modern.py).
  np.savez(tmp_path / "gen.npz",
           image=np.zeros((4, 32, 32, 3), np.uint8),
           label=np.arange(4))
  config = _load(name, arg, tmp_path)
  validate.check_config(config)
  model = state_lib.build_model(config)
  tx, _ = optim.make_optimizer(config.optim, config.epochs, 100)
  size = model.img_size
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))["params"]
  opt_state = jax.eval_shape(tx.init, params)
  assert jax.tree.leaves(params) and jax.tree.leaves(opt_state) is not None
  if config.init.checkpoint:
    assert config.init.checkpoint.startswith(str(tmp_path))
    assert pathlib.Path(config.init.checkpoint).stem == config.model.name


def test_paper_settings():
  imagenet = importlib.import_module("configs.imagenet").get_config()
  assert (imagenet.attack.eps, imagenet.attack.alpha, imagenet.attack.steps,
          imagenet.epochs, imagenet.tricks.warmup_epochs,
          imagenet.batch_size) == (4 / 255, 1 / 255, 5, 10.0, 2.0, 512)
  nette = importlib.import_module("configs.imagenette").get_config("root=x")
  assert (nette.data.image_size, state_lib.build_model(nette).patch_size,
          nette.tricks.prm_patch_size) == (224, 16, 16)
  rand = studies.get_config("study=augmentation,arm=randaugment")
  assert rand.augment.randaugment and rand.mixup.prob == 0
  adamw = studies.get_config("study=optimizer,arm=adamw_cyclic")
  assert (adamw.optim.name, adamw.optim.schedule) == ("adamw", "cyclic")
  scratch = studies.get_config("study=pretraining,arm=scratch")
  assert scratch.init.checkpoint == ""


@pytest.mark.parametrize("name,arg", [("cifar10", "method"),
                                      ("cifar10", "colour=red"),
                                      ("cifar10", "pretrained=jft"),
                                      ("cifar10", "model=deit_tiny_patch16_224,"
                                       "pretrained=in21k"),
                                      ("studies", "study=dropout"),
                                      ("studies", "study=clip,arm=maybe"),
                                      ("imagenette", "version=v3")])
def test_bad_arguments_are_rejected(name, arg):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError):
    module.get_config(arg)


def test_sweep_dry_run_prints_one_command_per_arm(capsys, tmp_path):
  sweep = importlib.import_module("scripts.sweep")
  assert sweep.main([
      "--study=ard_prm", f"--base_workdir={tmp_path}", "--dry_run", "--",
      "--config.epochs=1"
  ]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  assert all("--config=configs/studies.py:study=ard_prm,arm=" in l and
             l.endswith("--config.epochs=1") for l in lines)
  assert len({l.split("--workdir=")[1] for l in lines}) == 4


@pytest.mark.parametrize("name,arg", [("imagenet", None),
                                      ("imagenette", "root=x")])
def test_paper_configs_evaluate_in_float32_whatever_they_train_in(name, arg):
  """The reference evaluates in float32: so do the 224-px paper configs,
  per epoch and at the end, even when they train in bfloat16 (GPU/TPU)."""
  from vitat_jax import evaluation  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config.compute_dtype = "bfloat16"  # what "auto" picks on GPU/TPU
  model = state_lib.build_model(config)
  assert model.dtype == jnp.bfloat16
  evaluator = evaluation.Evaluator.from_config(config, model, None)
  assert evaluator.model.dtype == jnp.float32
  assert evaluator.model.precision == "highest"


def test_the_32px_swin_builds_patch_2_and_window_4():
  config = _load("cifar10", "model=swin_tiny_patch4_window7_224", "/tmp")
  model = state_lib.build_model(config)
  assert (model.img_size, model.patch_size, model.window_size) == (32, 2, 4)

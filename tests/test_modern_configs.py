"""The modern recipes' configs (configs/cifar10_modern.py,
configs/imagenet_modern.py) validate with their sources' values, and each
trains at tiny size through the full loop: its optimiser and parameter
groups, EMA, training attack (APGD-CE-2 for Singh et al.'s ViT-B, PGD-3 for
ARES's Swin-B, TRADES for DM-Improves-AT), RandAugment, Mixup/CutMix, label
smoothing and, for CIFAR-10, generated extra data in every batch."""

import importlib
import json

import numpy as np
import pytest

from tests import _tiny
from vitat_jax import train
from vitat_jax import validate

SWIN = "swin_base_patch4_window7_224"


def _modern(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_the_recipes_hold_their_sources_values(tmp_path):
  vit = _modern("imagenet_modern")
  assert (vit.attack.name, vit.attack.steps, vit.attack.eps) == ("apgd", 2,
                                                                 4 / 255)
  assert (vit.optim.name, vit.optim.lr, vit.optim.b2, vit.optim.weight_decay,
          vit.optim.warmup_epochs, vit.epochs) == ("adamw", 1e-3, 0.95, 0.05,
                                                   20.0, 300.0)
  assert vit.mixup.label_smoothing == 0.1 and vit.ema.decay > 0
  assert vit.init.checkpoint == ""  # from scratch
  swin = _modern("imagenet_modern", f"model={SWIN}")
  assert (swin.attack.name, swin.attack.steps,
          swin.attack.alpha) == ("pgd", 3, 8 / 255 / 3)
  assert (swin.ema.decay, swin.optim.warmup_epochs,
          swin.optim.no_decay) == (0.9998, 5.0, "auto")
  np.savez(tmp_path / "gen.npz",
           image=np.zeros((4, 32, 32, 3), np.uint8),
           label=np.arange(4))
  c10 = _modern("cifar10_modern", f"extra={tmp_path}/gen.npz")
  assert (c10.method, c10.beta, c10.ema.decay, c10.mixup.label_smoothing,
          c10.data.extra_fraction, c10.optim.lr,
          c10.optim.nesterov) == ("trades", 5.0, 0.995, 0.1, 0.7, 0.2, True)
  assert _modern("cifar10_modern").data.extra_fraction == 0.0
  for config in (vit, swin, c10):
    validate.check_config(config)
  with pytest.raises(ValueError, match="use one of"):
    _modern("imagenet_modern", "model=resnet50")


def _tiny_run(config, workdir):
  """`config` on the digits at 8 px, a tiny model, 2 steps, a clean
  evaluation of 32 images."""
  config.data.name = "digits"
  config.data.train_examples = 64
  config.init.checkpoint = ""
  if config.model.name.startswith("swin"):
    config.data.image_size = 8
    # Two stages of one block, two heads each (the per-stage tuple replaces
    # the int field).
    del config.model["num_heads"]
    config.model.update(
        dict(patch_size=2,
             embed_dim=16,
             depths=(1, 1),
             num_heads=(2, 2),
             window_size=2))
  else:
    _tiny.shrink(config)
  config.tricks.prm_patch_size = 4
  config.data.train_transform = "squash"
  config.batch_size = 32
  config.epochs = 1.0
  config.optim.warmup_epochs = 0.5
  config.eval.batch_size = 32
  config.eval.num_examples = 32
  config.eval.attacks = ("clean",)
  config.eval.epoch_num_examples = 0
  config.log_every_steps = 1
  result = train.train_and_evaluate(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    logged = [r for r in map(json.loads, f) if "train_loss" in r]
  return result, logged


@pytest.mark.parametrize("arg", [None, f"model={SWIN}"])
def test_imagenet_modern_trains_at_tiny_size(arg, tmp_path):
  result, logged = _tiny_run(_modern("imagenet_modern", arg), tmp_path)
  assert result["steps"] == 2 and [r["step"] for r in logged] == [1, 2]
  assert all(np.isfinite(r["train_loss"]) for r in logged)
  assert result["weights"] == "ema"


def test_cifar10_modern_trains_with_extra_data_at_tiny_size(tmp_path):
  rng = np.random.default_rng(0)
  extra = tmp_path / "generated.npz"
  np.savez(extra,
           image=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 40).astype(np.int64))
  config = _modern("cifar10_modern", f"extra={extra}")
  result, logged = _tiny_run(config, tmp_path / "run")
  assert all(np.isfinite(r["train_loss"]) for r in logged)
  assert result["weights"] == "ema"

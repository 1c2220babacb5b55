"""A model named for what it is: the timm name and, when the config's shape
fields change it, the variant (workdir, log, report, card)."""

import os

from configs import cifar10
from configs import quickstart
from vitat_jax import cli
from vitat_jax import model_names


def test_the_quickstart_is_named_for_its_real_shape(tmp_path, monkeypatch):
  config = quickstart.get_config()
  assert model_names.variant(config) == "w64-d4-h4-p4-16px"
  assert model_names.label(config) == (
      "deit_tiny_patch16_224 (width 64, depth 4, heads 4, patch 4, image "
      "size 16 px)")
  monkeypatch.chdir(tmp_path)
  assert cli.default_workdir(config, "configs/quickstart.py") == os.path.join(
      "runs", "quickstart_deit_tiny_patch16_224-w64-d4-h4-p4-16px_at_ard_prm")


def test_a_registry_shape_keeps_its_name():
  config = cifar10.get_config("model=vit_base_patch16_224")
  config.model.patch_size = None
  config.data.image_size = 224
  assert model_names.variant(config) == ""
  assert model_names.label(config) == "vit_base_patch16_224"
  # The paper's CIFAR-10 adaptation is a variant: 4-px patches at 32 px.
  assert model_names.variant(
      cifar10.get_config("model=deit_tiny_patch16_224")) == "p4-32px"


def test_a_run_started_before_the_variant_names_keeps_its_workdir(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = quickstart.get_config()
  legacy = os.path.join("runs", "quickstart_deit_tiny_patch16_224_at_ard_prm")
  os.makedirs(os.path.join(legacy, "checkpoints"))
  assert cli.default_workdir(config, "configs/quickstart.py") == legacy

"""Helpers shared by the paper's configs: `:arg` parsing and pre-trained paths.

Pre-trained checkpoints are local files (nothing downloads at run time):
`pretrained=in1k` reads `<pretrained_dir>/<model>.safetensors`, and
`pretrained=in21k` switches to the model's ImageNet-21k variant
(`vit_base_patch16_224_in21k`, `swin_base_patch4_window7_224_in22k`) and reads
`<pretrained_dir>/<that name>.safetensors`; `.pth` / `.npz` files are found
too. Save timm's weights there once, e.g.
`timm.create_model(name, pretrained=True)` then
`safetensors.torch.save_file(model.state_dict(), f"{dir}/{name}.safetensors")`.
"""

import difflib
import os

from vitat_jax.models import registry

BOOLS = {"true": True, "false": False, "1": True, "0": False}
PRETRAINED = ("scratch", "in1k", "in21k")
_EXTENSIONS = (".safetensors", ".pth", ".npz")

# The paper's model list (the reference's --model names). The reference's
# own `vit_small_patch16_224` is timm's early custom ViT-S (768 wide, depth
# 8), registered here as `vit_small_patch16_224_legacy`; the plain name
# keeps timm's current meaning (384 wide, depth 12).
PAPER_MODELS = (
    "vit_small_patch16_224_legacy", "vit_base_patch16_224",
    "vit_base_patch16_224_in21k", "deit_small_patch16_224",
    "deit_tiny_patch16_224", "convit_base", "convit_small", "convit_tiny")


def parse_arg(arg, keys, bool_keys=(), int_keys=(), float_keys=()):
  """'model=x,ard=True' -> {'model': 'x', 'ard': True}; unknown keys rejected."""
  values = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f"did you mean {close[0]}? " if close else ""
      raise ValueError(f"bad config argument {item!r}: {hint}use key=value "
                       f"with keys {', '.join(keys)}")
    if key in bool_keys:
      if value.lower() not in BOOLS:
        raise ValueError(f"{key}={value!r} must be True or False")
      value = BOOLS[value.lower()]
    elif key in int_keys or key in float_keys:
      kind = int if key in int_keys else float
      try:
        value = kind(value)
      except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key}={value!r} must be {what}") from None
    values[key] = value
  return values


def _in21k_name(name):
  if name.endswith(("_in21k", "_in22k")):
    return name
  for suffix in ("_in21k", "_in22k"):
    if name + suffix in registry.list_models():
      return name + suffix
  raise ValueError(f"model {name!r} has no ImageNet-21k variant here: use "
                   "pretrained=in1k or scratch (ViT-B/16 and Swin-B have one)")


def checkpoint_path(name, pretrained_dir):
  """The first existing `<dir>/<name>{.safetensors,.pth,.npz}`, else the
  .safetensors path (validation then says it is missing)."""
  for ext in _EXTENSIONS:
    path = os.path.join(pretrained_dir, name + ext)
    if os.path.isfile(path):
      return path
  return os.path.join(pretrained_dir, name + _EXTENSIONS[0])


def apply_pretrained(config, pretrained, pretrained_dir):
  """Sets model.name / init.checkpoint for scratch, in1k or in21k."""
  if pretrained not in PRETRAINED:
    raise ValueError(f"pretrained={pretrained!r}: use one of "
                     f"{', '.join(PRETRAINED)}")
  if pretrained == "scratch":
    config.init.checkpoint = ""
    return config
  # A model named *_in21k / *_in22k always reads its own (21k) weights.
  if pretrained == "in21k":
    config.model.name = _in21k_name(config.model.name)
  # A .pth found here loads as plain weights only: pickled objects run code,
  # so only the user's own --config.init.allow_pickle=True turns them on.
  config.init.checkpoint = checkpoint_path(config.model.name, pretrained_dir)
  return config

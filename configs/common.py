"""Helpers shared by the paper's configs: `:arg` parsing and pre-trained paths.

Plain data and string handling only: nothing here imports `vitat_jax`, so
loading a config costs no JAX import.

Pre-trained checkpoints are local files (nothing downloads at run time):
`pretrained=in1k` reads `<pretrained_dir>/<model>.safetensors`, and
`pretrained=in21k` switches to the model's ImageNet-21k variant
(`vit_base_patch16_224_in21k`, `swin_base_patch4_window7_224_in22k`) and reads
`<pretrained_dir>/<that name>.safetensors`; `.pth` / `.npz` files are found
too. `REFERENCE_WEIGHTS` names, for every model the reference trains, the
timm tag (or URL) of the exact weights the reference starts from; save them
once with `python scripts/save_pretrained.py --dir=DIR MODEL...` on a machine
with internet access.
"""

import difflib
import os

BOOLS = {"true": True, "false": False, "1": True, "0": False}
PRETRAINED = ("scratch", "in1k", "in21k")
_EXTENSIONS = (".safetensors", ".pth", ".npz")

# The paper's model list (the reference's --model names). The reference's
# own `vit_small_patch16_224` is timm's early custom ViT-S (768 wide, depth
# 8), registered here as `vit_small_patch16_224_legacy`; the plain name
# keeps timm's current meaning (384 wide, depth 12).
PAPER_MODELS = ("vit_small_patch16_224_legacy", "vit_base_patch16_224",
                "vit_base_patch16_224_in21k", "deit_small_patch16_224",
                "deit_tiny_patch16_224", "convit_base", "convit_small",
                "convit_tiny")
# The reference also trains Swin-T/S/B, on Imagenette only (momentum 0.5).
SWIN_MODELS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
               "swin_base_patch4_window7_224")

# The weights each reference model loads (its default_cfgs URLs), as the
# timm tag that holds the same file today. The reference's ViT-B/16 is the
# original 2020 in21k->in1k release (`orig_in21k_ft_in1k`), not the augreg
# weights that timm >= 1.0 gives `vit_base_patch16_224` by default; its in21k
# file had a pre-logits layer that timm's `orig_in21k` re-save drops, as the
# reference does when fine-tuning. The legacy ViT-S has no timm tag any more:
# it is timm's v0.1 release file, fetched by URL.
REFERENCE_WEIGHTS = {
    "vit_small_patch16_224_legacy":
        ("https://github.com/rwightman/pytorch-image-models/releases/download/"
         "v0.1-weights/vit_small_p16_224-15ec54c9.pth"),
    "vit_base_patch16_224":
        "vit_base_patch16_224.orig_in21k_ft_in1k",
    "vit_base_patch16_224_in21k":
        "vit_base_patch16_224.orig_in21k",
    "deit_tiny_patch16_224":
        "deit_tiny_patch16_224.fb_in1k",
    "deit_small_patch16_224":
        "deit_small_patch16_224.fb_in1k",
    "convit_tiny":
        "convit_tiny.fb_in1k",
    "convit_small":
        "convit_small.fb_in1k",
    "convit_base":
        "convit_base.fb_in1k",
    "swin_tiny_patch4_window7_224":
        "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_small_patch4_window7_224":
        "swin_small_patch4_window7_224.ms_in1k",
    "swin_base_patch4_window7_224":
        "swin_base_patch4_window7_224.ms_in22k_ft_in1k",
    "swin_base_patch4_window7_224_in22k":
        "swin_base_patch4_window7_224.ms_in22k",
}

# pretrained=in21k: the ImageNet-21k variant of a model.
IN21K_VARIANTS = {
    "vit_base_patch16_224": "vit_base_patch16_224_in21k",
    "vit_base_patch32_224": "vit_base_patch32_224_in21k",
    "vit_large_patch16_224": "vit_large_patch16_224_in21k",
    "vit_large_patch32_224": "vit_large_patch32_224_in21k",
    "swin_base_patch4_window7_224": "swin_base_patch4_window7_224_in22k",
    "swin_base_patch4_window12_384": "swin_base_patch4_window12_384_in22k",
}


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
  if name in IN21K_VARIANTS:
    return IN21K_VARIANTS[name]
  # A misspelt name is named as such, not as a model without 21k weights.
  known = {*PAPER_MODELS, *SWIN_MODELS, *REFERENCE_WEIGHTS, *IN21K_VARIANTS}
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.9)
  if close and close[0] != name:
    raise ValueError(f"unknown model {name!r}: did you mean {close[0]}?")
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
  """Sets model.name / init.checkpoint / init.source for scratch, in1k or in21k.

  Never turns on `init.allow_pickle`: a `.pth` found here is read with
  torch's weights-only loader, and only the user's own flag allows more.
  """
  if pretrained not in PRETRAINED:
    raise ValueError(f"pretrained={pretrained!r}: use one of "
                     f"{', '.join(PRETRAINED)}")
  if pretrained == "scratch":
    config.init.checkpoint = ""
    config.init.source = ""
    return config
  # A model named *_in21k / *_in22k always reads its own (21k) weights.
  if pretrained == "in21k":
    config.model.name = _in21k_name(config.model.name)
  # A .pth found here loads as plain weights only: pickled objects run code,
  # so only the user's own --config.init.allow_pickle=True turns them on.
  config.init.checkpoint = checkpoint_path(config.model.name, pretrained_dir)
  config.init.source = REFERENCE_WEIGHTS.get(
      config.model.name, f"timm's default weights of {config.model.name}")
  return config

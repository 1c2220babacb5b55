"""What a run's model is called: its timm name, and the variant when the
config's shape fields make it another network (no JAX needed).

    model_names.label(config)     # "deit_tiny_patch16_224 (width 64, ...)"
    model_names.variant(config)   # "w64-d4-h4-p4-16px", "" for the name's
    model_names.sgd_momentum(None, "swin_tiny_patch4_window7_224")  # 0.5

The quickstart's width-64, depth-4, 16-px ViT is built from the registry
entry `deit_tiny_patch16_224` with overrides; the workdir name, the log,
the plots, the report and the model card say which network it really is.
A field counts as changed when the config sets it (a non-None model field)
and, for the patch and image size, when it differs from what the timm name
states (`_patch16_`, `_224`).
"""

import re
from typing import List, Tuple

_PATCH = re.compile(r"_patch(\d+)")
_SIZE = re.compile(r"_(\d{2,4})(?:_|$)")
# (config field, short tag, long name)
_SHAPE_FIELDS = (("embed_dim", "w",
                  "width"), ("depth", "d", "depth"), ("depths", "d", "depths"),
                 ("num_heads", "h", "heads"), ("window_size", "win", "window"))


def _image_size(config):
  return config.model.get("img_size") or config.data.get("image_size") or None


def _changes(config) -> List[Tuple[str, str, str]]:
  """[(tag, value, long name)] of the shape fields that differ."""
  model = config.model
  changes = []
  for field, tag, name in _SHAPE_FIELDS:
    value = model.get(field)
    if value is None:
      continue
    text = ("-".join(
        str(v) for v in value) if isinstance(value,
                                             (tuple, list)) else str(value))
    changes.append((tag, text, name))
  patch = model.get("patch_size")
  named = _PATCH.search(model.name)
  if patch is not None and (named is None or int(named.group(1)) != patch):
    changes.append(("p", str(patch), "patch"))
  size = _image_size(config)
  named = _SIZE.search(model.name)
  if size and (named is None or int(named.group(1)) != size):
    changes.append(("", f"{size}px", "image size"))
  return changes


def variant(config) -> str:
  """"w64-d4-h4-p4-16px": the changed shape fields, "" when none."""
  return "-".join(tag + value for tag, value, _ in _changes(config))


def label(config) -> str:
  """The timm name, followed by the variant in words when there is one."""
  changes = _changes(config)
  if not changes:
    return config.model.name
  words = ", ".join(
      f"{name} {value.replace('px', ' px')}" for _, value, name in changes)
  return f"{config.model.name} ({words})"


# The reference's SGD momentum per model family (train_imagenet.py and
# train_imagenette.py set 0.5 for Swin); the first matching prefix wins.
FAMILY_MOMENTUM = (("swin", 0.5), ("", 0.9))


def sgd_momentum(momentum, model_name: str) -> float:
  """`optim.momentum`, or the model family's when it is None: the one place
  that resolves it, however the model was named (`:model=` or
  `--config.model.name=`)."""
  if momentum is not None:
    return momentum
  return next(value for prefix, value in FAMILY_MOMENTUM
              if model_name.startswith(prefix))

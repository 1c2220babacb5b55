"""Model registry: timm names to Flax modules, with timm's keyword overrides."""

import dataclasses
import difflib
from typing import Any, Callable, Dict

from vitat_jax.errors import UserError

_REGISTRY: Dict[str, tuple] = {}


def register(name: str, module_cls: Callable[..., Any], **defaults):
  """Registers `name` as `module_cls(**defaults)`; overrides come at create."""
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is registered twice")
  _REGISTRY[name] = (module_cls, defaults)


def list_models(pattern: str = "") -> list:
  """Registered names containing `pattern`, sorted."""
  return sorted(n for n in _REGISTRY if pattern in n)


def model_defaults(name: str) -> dict:
  """The keyword arguments `create(name)` would use, without overrides."""
  _check_name(name)
  module_cls, defaults = _REGISTRY[name]
  fields = {
      f.name: f.default
      for f in dataclasses.fields(module_cls)
      if f.name not in ("parent", "name")
  }
  fields.update(defaults)
  return fields


def module_class(name: str):
  """The Flax module class registered as `name` (its family)."""
  _check_name(name)
  return _REGISTRY[name][0]


def _check_name(name: str):
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else (
        f"valid names: {', '.join(list_models())}")
    raise UserError(f"unknown model {name!r}: {hint}")


def create(name: str, **overrides):
  """Builds the registered model `name`, overriding timm-named keywords.

  Example: `create("deit_tiny_patch16_224", num_classes=10, img_size=32,
  patch_size=4, mean=(...), std=(...))`. Keywords are timm's own
  (`img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`,
  `mlp_ratio`, `qkv_bias`, `drop_path_rate`, ...) plus `mean`/`std` for the
  input normalisation and `dtype` for the compute precision.
  """
  _check_name(name)
  module_cls, defaults = _REGISTRY[name]
  accepted = {f.name for f in dataclasses.fields(module_cls)
             } - {"parent", "name"}
  in_chans = overrides.pop("in_chans", 3)
  if in_chans != 3:
    raise UserError(f"in_chans={in_chans} is not supported: models take RGB "
                    "NHWC images with 3 channels")
  unknown = sorted(set(overrides) - accepted)
  if unknown:
    raise UserError(f"unknown keyword(s) {', '.join(unknown)} for model "
                    f"{name!r}; accepted: {', '.join(sorted(accepted))}")
  kwargs = {**defaults, **overrides}
  for key in ("mean", "std"):
    if key in kwargs:
      kwargs[key] = tuple(float(v) for v in kwargs[key])
  module = module_cls(**kwargs)
  check = getattr(module, "check_config", None)
  if check is not None:
    check()
  return module


def create_from_config(model_config, **data_kwargs):
  """`create` from a config section: `name` plus timm keywords (None = default).

  `data_kwargs` (img_size, num_classes, mean, std from the data set) fill in
  what the config section leaves unset; an explicit config value wins.
  """
  overrides = {
      k: v for k, v in model_config.items() if k != "name" and v is not None
  }
  for key, value in data_kwargs.items():
    if value is not None and overrides.get(key) is None:
      overrides[key] = value
  return create(model_config.name, **overrides)

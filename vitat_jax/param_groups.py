"""Parameter groups of the optimiser: which leaf is decayed, at which depth.

    mask = param_groups.decay_mask(config.optim)       # None: decay all
    scales = param_groups.layer_scales(0.75, params)  # {name: lr factor}

Everything here is a function of a param tree's paths and shapes, never of
its values, so the same groups come out of real params, of the tracers
inside `jit` and of `jax.eval_shape`'s shapes. A leaf's name is its path
joined by "/" (`blocks_3/attn/qkv/kernel`).

No weight decay (`optim.no_decay="auto"`, timm's `no_weight_decay()` plus
its 1-D rule): every leaf of at most one dimension (biases, LayerNorm
scales and biases, ConViT's gating params) and the tokens and position
tables named in `NO_DECAY_NAMES` (class and distillation tokens, absolute
position embeddings, Swin's relative position bias tables).
`optim.no_decay_extra` adds regular expressions searched in the names.
`""` is the optimiser's own default: "auto" for AdamW, "none" (decay every
leaf, the reference's SGD) for SGD.

Layer ids (BEiT's layer-wise lr decay, as timm's `param_groups_layer_decay`
and ARES use it): the patch embedding, tokens and position embeddings are
layer 0; block i is layer i + 1, Swin's blocks counted through the stages
(a stage's patch merging joins its first block); the final norm, the
head(s) and anything after the blocks are layer L = blocks + 1. The lr of
a leaf at layer l is scaled by layer_decay ** (L - l).
"""

import re
from typing import Callable, Dict, Optional, Tuple

import jax
import numpy as np

from vitat_jax import models
from vitat_jax.models import registry

NO_DECAY_MODES = ("", "auto", "none")
NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed", "absolute_pos_embed",
                  "relative_position_bias_table")
# Leaves of layer 0 by their top-level name.
EMBEDDING_NAMES = ("patch_embed", "cls_token", "dist_token", "pos_embed",
                   "absolute_pos_embed")
# The families whose param trees `layer_ids` knows: blocks_i (ViT, DeiT,
# ConViT) or layers_s/blocks_b (Swin).
LAYER_DECAY_FAMILIES = (models.VisionTransformer, models.ConViT,
                        models.SwinTransformer)

_BLOCK = re.compile(r"blocks_(\d+)")
_STAGE = re.compile(r"layers_(\d+)")
_INDEX = re.compile(r"(blocks|layers)_\d+")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """A leaf's name: its key path joined by "/"."""
  return "/".join(_key_name(k) for k in path)


def named_leaves(tree) -> list:
  """[(name, leaf)] of `tree`, in its flattening order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_name(path), leaf) for path, leaf in leaves]


def no_decay_mode(opt) -> str:
  """`optim.no_decay` with "" resolved: "auto" for AdamW, "none" for SGD."""
  if opt.no_decay:
    return opt.no_decay
  return "auto" if opt.name == "adamw" else "none"


def decays(name: str, ndim: int, mode: str, extra: tuple = ()) -> bool:
  """Whether the leaf `name` of `ndim` dimensions gets weight decay."""
  if any(re.search(pattern, name) for pattern in extra):
    return False
  if mode == "auto":
    return ndim > 1 and name.rsplit("/", 1)[-1] not in NO_DECAY_NAMES
  return True


def decay_mask(opt) -> Optional[Callable]:
  """optax's `mask=` for `opt` (an `optim` section): a function of a tree
  giving True where a leaf is decayed, or None when every leaf is (the
  chain is then the one without a mask, bit for bit)."""
  mode, extra = no_decay_mode(opt), tuple(opt.no_decay_extra)
  if mode == "none" and not extra:
    return None

  def mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: decays(path_name(path), np.ndim(leaf), mode, extra),
        tree)

  return mask


def no_decay_names(opt, params) -> list:
  """The names of the leaves of `params` that get no weight decay."""
  mask = decay_mask(opt)
  if mask is None:
    return []
  flags = named_leaves(mask(params))
  return [name for name, decayed in flags if not decayed]


def supports_layer_decay(model_name: str) -> bool:
  """Whether `layer_ids` knows the param tree of the registered model."""
  return issubclass(registry.module_class(model_name), LAYER_DECAY_FAMILIES)


def layer_ids(params) -> Tuple[Dict[str, int], int]:
  """({leaf name: layer id}, L): the ids of the module docstring."""
  names = [name for name, _ in named_leaves(params)]
  depth, stage_depths = 0, {}
  for parts in (name.split("/") for name in names):
    top_block = _BLOCK.fullmatch(parts[0])
    if top_block:
      depth = max(depth, int(top_block.group(1)) + 1)
    stage = _STAGE.fullmatch(parts[0])
    stage_block = len(parts) > 1 and _BLOCK.fullmatch(parts[1])
    if stage and stage_block:
      s = int(stage.group(1))
      stage_depths[s] = max(stage_depths.get(s, 0),
                            int(stage_block.group(1)) + 1)
  num_layers = depth + sum(stage_depths.values()) + 1

  def layer_of(parts):
    if parts[0] in EMBEDDING_NAMES:
      return 0
    block = _BLOCK.fullmatch(parts[0])
    if block:
      return int(block.group(1)) + 1
    stage = _STAGE.fullmatch(parts[0])
    if stage:
      s = int(stage.group(1))
      first = 1 + sum(d for t, d in stage_depths.items() if t < s)
      block = len(parts) > 1 and _BLOCK.fullmatch(parts[1])
      return first + int(block.group(1)) if block else first
    return num_layers

  return {name: layer_of(name.split("/")) for name in names}, num_layers


def layer_decay_on(layer_decay: float) -> bool:
  """0 and 1 both mean no layer-wise decay."""
  return 0 < layer_decay < 1


def grouped(opt) -> bool:
  """Whether `opt` treats some leaves differently from others."""
  return decay_mask(opt) is not None or layer_decay_on(opt.layer_decay)


def layer_scales(layer_decay: float, params) -> Dict[str, float]:
  """{leaf name: layer_decay ** (L - layer id)}."""
  ids, num_layers = layer_ids(params)
  return {name: layer_decay**(num_layers - i) for name, i in ids.items()}


def _collapsed(names) -> str:
  """Names with the blocks collapsed, in first-seen order: `blocks_* (x12):
  {attn/qkv/bias, norm1/scale, ...}`; a name found in fewer of the blocks
  says in how many."""
  groups = {}  # collapsed prefix -> ({raw prefix}, {rest: count})
  for name in names:
    parts = name.split("/")
    cut = max((i + 1 for i, p in enumerate(parts) if _INDEX.fullmatch(p)),
              default=0)
    raw = "/".join(parts[:cut])
    blocks, rests = groups.setdefault(_INDEX.sub(r"\1_*", raw), (set(), {}))
    blocks.add(raw)
    rest = "/".join(parts[cut:])
    rests[rest] = rests.get(rest, 0) + 1
  shown = []
  for prefix, (blocks, rests) in groups.items():
    if not prefix:
      shown.extend(rests)
      continue
    inner = ", ".join(
        r + (f" (x{n})" if n != len(blocks) else "") for r, n in rests.items())
    shown.append(f"{prefix} (x{len(blocks)}): {{{inner}}}")
  return ", ".join(shown)


def describe(opt, params) -> str:
  """One line: the leaves without weight decay and the layer-decay scales."""
  leaves = named_leaves(params)
  excluded = set(no_decay_names(opt, params))
  values = sum(
      int(np.prod(leaf.shape)) for name, leaf in leaves if name in excluded)
  line = (f"weight decay off (optim.no_decay={no_decay_mode(opt)!r}, "
          f"no_decay_extra={tuple(opt.no_decay_extra)}) for {len(excluded)} "
          f"of {len(leaves)} param arrays ({values} values)")
  if excluded:
    line += ": " + _collapsed(name for name, _ in leaves if name in excluded)
  if layer_decay_on(opt.layer_decay):
    scales = layer_scales(opt.layer_decay, params)
    _, num_layers = layer_ids(params)
    line += (f"; layer decay {opt.layer_decay:g}, L={num_layers}: lr scale "
             f"{min(scales.values()):.4g} (layer 0: patch embedding, tokens) "
             f"to {max(scales.values()):g} (layer L: final norm, head)")
  return line

"""Names and layouts: Flax params <-> timm state dicts <-> Google .npz files.

Flax module names were chosen to mirror timm's, so a Flax path maps to a timm
key by rule: `blocks_3` -> `blocks.3`, `kernel`/`scale` -> `weight`, Dense
kernels transposed, conv kernels HWIO -> OIHW. The few exceptions (a conv
named `patch_embed` for timm's `patch_embed.proj`, Swin's `head.fc`) are one
table per family. Google's ViT `.npz` naming is first turned into timm keys.
"""

import re
from typing import Dict, Tuple

from absl import logging
import numpy as np

from vitat_jax.errors import UserError
from vitat_jax.models.convit import ConViT
from vitat_jax.models.swin import SwinTransformer
from vitat_jax.models.vit import VisionTransformer

# Flax top-level module -> timm module, per family.
_RENAMES = {
    "vit": {
        "patch_embed": "patch_embed.proj",
        "pre_logits": "pre_logits.fc"
    },
    "convit": {
        "patch_embed": "patch_embed.proj"
    },
    "swin": {
        "head": "head.fc"
    },
}
# timm buffers some checkpoints carry; they are recomputed, never loaded.
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask",
                   "relative_coords_table")


def family(model) -> str:
  if isinstance(model, VisionTransformer):
    return "vit"
  if isinstance(model, ConViT):
    return "convit"
  if isinstance(model, SwinTransformer):
    return "swin"
  raise UserError(f"no checkpoint converter for {type(model).__name__}: "
                  "use a model from vitat_jax.models.create")


def timm_key(path: Tuple[str, ...], fam: str) -> str:
  """The timm state-dict key of the Flax param at `path`."""
  *modules, leaf = path
  if modules and modules[0] in _RENAMES[fam]:
    modules = _RENAMES[fam][modules[0]].split(".") + modules[1:]
  parts = []
  for name in modules:
    match = re.fullmatch(r"(blocks|layers)_(\d+)", name)
    parts.extend(match.groups() if match else [name])
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parts + [leaf])


def to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  """timm layout -> Flax layout for the param named `leaf`."""
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def to_timm(value: np.ndarray, leaf: str) -> np.ndarray:
  """Flax layout -> timm layout for the param named `leaf`."""
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def timm_shape(shape: Tuple[int, ...], leaf: str) -> Tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def normalise_state_dict(state: Dict[str, np.ndarray],
                         fam: str) -> Dict[str, np.ndarray]:
  """Strips wrappers, drops buffers and maps older timm/Microsoft layouts."""
  keys = list(state)
  for wrapper in ("module.", "model.", "state_dict."):
    if keys and all(k.startswith(wrapper) for k in keys):
      logging.info("checkpoint: stripped the %r prefix from every key", wrapper)
      state = {k[len(wrapper):]: v for k, v in state.items()}
      keys = list(state)
  out = {}
  old_swin = fam == "swin" and "layers.0.downsample.reduction.weight" in state
  for key, value in state.items():
    if key.endswith(BUFFER_SUFFIXES):
      logging.info("checkpoint: ignored buffer %s", key)
      continue
    new_key = key
    if old_swin:  # Microsoft layout: merging at the end of stages 0..2.
      new_key = re.sub(r"^layers\.(\d+)\.downsample",
                       lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                       new_key)
      new_key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", new_key)
    if fam == "vit" and re.fullmatch(r"pre_logits\.(weight|bias)", new_key):
      new_key = new_key.replace("pre_logits.", "pre_logits.fc.")
    if new_key != key:
      logging.info("checkpoint: renamed %s -> %s", key, new_key)
    out[new_key] = value
  return out


def _hwio_to_oihw(x):
  return x.transpose(3, 2, 0, 1)


def npz_to_timm(w: Dict[str, np.ndarray],
                num_prefix_tokens: int = 1) -> Dict[str, np.ndarray]:
  """Google ViT (vision_transformer / big_vision) .npz -> timm ViT keys."""
  prefix = ""
  for candidate in ("opt/target/", "params/img/", "params/"):
    if f"{candidate}embedding/kernel" in w:
      prefix = candidate
  if f"{prefix}embedding/kernel" not in w:
    raise UserError("this .npz is not a ViT checkpoint (no embedding/kernel): "
                    "only Google ViT / big_vision ViT files are supported")
  get = lambda name: w[f"{prefix}{name}"]
  has = lambda name: f"{prefix}{name}" in w
  big_vision = (prefix.startswith("params/") or has("pos_embedding") or
                has("Transformer/encoderblock/LayerNorm_0/scale"))
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  sd = {
      "patch_embed.proj.weight": _hwio_to_oihw(get("embedding/kernel")),
      "patch_embed.proj.bias": get("embedding/bias")
  }
  if has("cls"):
    sd["cls_token"] = get("cls")
  if has("Transformer/posembed_input/pos_embedding"):
    sd["pos_embed"] = get("Transformer/posembed_input/pos_embedding")
  elif has("pos_embedding"):
    # big_vision adds position embeddings to the patches only; timm's layout
    # has a slot per prefix token, which is zero here.
    pos = get("pos_embedding")
    pos = pos.reshape(1, -1, pos.shape[-1])
    zeros = np.zeros((1, num_prefix_tokens, pos.shape[-1]), pos.dtype)
    sd["pos_embed"] = np.concatenate([zeros, pos], axis=1)
    logging.info("checkpoint: pos_embedding has no class-token slot; a zero "
                 "one was added")
  scanned = has("Transformer/encoderblock/LayerNorm_0/scale")
  if scanned:
    depth = get("Transformer/encoderblock/LayerNorm_0/scale").shape[0]
  else:
    depth = 0
    while has(f"Transformer/encoderblock_{depth}/LayerNorm_0/scale"):
      depth += 1
  for i in range(depth):
    if scanned:
      block = lambda name, i=i: get(f"Transformer/encoderblock/{name}")[i]
    else:
      block = lambda name, i=i: get(f"Transformer/encoderblock_{i}/{name}")
    attn = f"MultiHeadDotProductAttention_{mha}/"
    t = f"blocks.{i}."
    sd[t + "norm1.weight"] = block("LayerNorm_0/scale")
    sd[t + "norm1.bias"] = block("LayerNorm_0/bias")
    sd[t + "attn.qkv.weight"] = np.concatenate([
        block(f"{attn}{n}/kernel").reshape(
            block(f"{attn}{n}/kernel").shape[0], -1).T
        for n in ("query", "key", "value")
    ])
    sd[t + "attn.qkv.bias"] = np.concatenate([
        block(f"{attn}{n}/bias").reshape(-1) for n in ("query", "key", "value")
    ])
    out = block(f"{attn}out/kernel")
    sd[t + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[t + "attn.proj.bias"] = block(f"{attn}out/bias")
    sd[t + "norm2.weight"] = block(f"LayerNorm_{ln2}/scale")
    sd[t + "norm2.bias"] = block(f"LayerNorm_{ln2}/bias")
    for r in range(2):
      sd[t +
         f"mlp.fc{r + 1}.weight"] = block(f"MlpBlock_{mlp}/Dense_{r}/kernel").T
      sd[t + f"mlp.fc{r + 1}.bias"] = block(f"MlpBlock_{mlp}/Dense_{r}/bias")
  sd["norm.weight"] = get("Transformer/encoder_norm/scale")
  sd["norm.bias"] = get("Transformer/encoder_norm/bias")
  for name, timm_name in (("head", "head"), ("pre_logits", "pre_logits.fc")):
    if has(f"{name}/kernel"):
      sd[f"{timm_name}.weight"] = get(f"{name}/kernel").T
      sd[f"{timm_name}.bias"] = get(f"{name}/bias")
  return sd

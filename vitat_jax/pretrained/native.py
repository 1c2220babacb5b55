"""An external checkpoint's network as timm defines it: name, sizes, inputs.

    spec = native.native_model("deit_tiny.safetensors", "deit_tiny_patch16_224")
    model = models.create(spec.name, **spec.kwargs)

The timm name and keywords come from, in order: the model card that
`--mode=export` writes beside its weights (`model_card.json`); else the
given name (`load_model`'s `name=`, `--mode=eval`'s `model.name`) with what
the weights' shapes fix: the class count (the head), the patch size and,
for ViT, DeiT and ConViT, the image size (the patch kernel and the position
embedding), Swin's window (its relative-position tables); the sizes the
weights do not fix are the name's. The normalisation is the card's, else
the caller's (`data.mean/std`), else timm's for the name
(`preprocessing.timm_preprocessing`). Only shapes are read (a .safetensors
file's header; other formats whole); nothing is computed.
"""

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Sequence

from vitat_jax import models
from vitat_jax.errors import UserError
from vitat_jax.pretrained import io
from vitat_jax.pretrained import naming
from vitat_jax.pretrained import preprocessing

CARD = "model_card.json"
# Keywords that the weights (or the card) fix for the network they hold.
SIZE_KEYWORDS = ("img_size", "patch_size", "window_size", "num_classes")


@dataclasses.dataclass(frozen=True)
class NativeModel:
  """The network a checkpoint holds, as `models.create(name, **kwargs)`.

  Attributes:
    name: the registered timm name.
    kwargs: timm keywords, with `img_size`, `num_classes`, `mean` and `std`
      always set.
    source: where the name, sizes and normalisation came from (for the log).
    preprocessing: timm's pre-processing of the name (crop_pct and
      interpolation of its evaluation resize), or None for a name the table
      lacks.
  """
  name: str
  kwargs: Dict[str, Any]
  source: str
  preprocessing: Optional[preprocessing.Preprocessing]

  @property
  def image_size(self) -> int:
    return int(self.kwargs["img_size"])

  @property
  def num_classes(self) -> int:
    return int(self.kwargs["num_classes"])

  @property
  def mean(self):
    return tuple(self.kwargs["mean"])

  @property
  def std(self):
    return tuple(self.kwargs["std"])

  def describe(self) -> str:
    """e.g. 'deit_tiny_patch16_224 (224 px, patch 16, 10 classes)'."""
    parts = [f"{self.image_size} px"]
    for key, word in (("patch_size", "patch"), ("window_size", "window")):
      if self.kwargs.get(key):
        parts.append(f"{word} {self.kwargs[key]}")
    parts.append(f"{self.num_classes} classes")
    return f"{self.name} ({', '.join(parts)})"


def card_beside(checkpoint: str) -> Optional[str]:
  """The path of the model card beside `checkpoint`, if there is one."""
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CARD)
  return path if os.path.isfile(path) else None


def _read_card(card_path: str, name_flag: str):
  """(timm name, timm keywords, mean, std) of a model card."""
  try:
    with open(card_path) as f:
      card = json.load(f)
    return (card["timm"]["name"], dict(card["timm"]["kwargs"]),
            tuple(card["input"]["mean"]), tuple(card["input"]["std"]))
  except (OSError, ValueError, KeyError, TypeError):
    raise UserError(f"{card_path} is not a vitat_jax model card (no "
                    "timm.name, timm.kwargs, input.mean/std): move it "
                    f"away and pass {name_flag}") from None


def sizes_from_shapes(shapes: Dict[str, Sequence[int]], name: str,
                      checkpoint: str) -> Dict[str, int]:
  """The timm keywords that a checkpoint's shapes fix for a model of
  `name`'s family: `num_classes`, `patch_size`, and `img_size` (ViT, DeiT,
  ConViT) or `window_size` (Swin)."""
  fam = naming.family(models.create(name))
  state = naming.normalise_state_dict(dict(shapes), fam)
  head = state.get("head.fc.weight", state.get("head.weight"))
  if head is None:
    raise UserError(f"{checkpoint} has no classifier (head.weight): it is not "
                    f"a timm {name} checkpoint")
  sizes = {"num_classes": int(head[0])}
  if "patch_embed.proj.weight" in state:
    sizes["patch_size"] = int(state["patch_embed.proj.weight"][-1])
  if "pos_embed" in state and "patch_size" in sizes:
    tokens = int(state["pos_embed"][1])
    if fam == "vit":
      tokens -= 1 + ("dist_token" in state)  # the class (and distillation)
    grid = math.isqrt(tokens)
    if grid * grid == tokens:
      sizes["img_size"] = grid * sizes["patch_size"]
  table = state.get("layers.0.blocks.0.attn.relative_position_bias_table")
  if fam == "swin" and table is not None:
    side = math.isqrt(int(table[0]))
    if side * side == int(table[0]) and side % 2:
      sizes["window_size"] = (side + 1) // 2
  return sizes


def _known_preprocessing(name: str) -> Optional[preprocessing.Preprocessing]:
  """timm's pre-processing of `name`, or None where the table has none."""
  try:
    return preprocessing.timm_preprocessing(name)
  except UserError:
    return None


def _timm_shapes(
    checkpoint: str,
    format: str,  # pylint: disable=redefined-builtin
    allow_pickle: bool
) -> Dict[str, Sequence[int]]:
  """{timm key: shape} of a checkpoint (a Google .npz renamed to timm's)."""
  if format == "npz" or format == "auto" and os.path.isfile(
      checkpoint) and io.detect_format(checkpoint) == "npz":
    tensors, _ = io.read(checkpoint, "npz")
    return {k: v.shape for k, v in naming.npz_to_timm(tensors).items()}
  return io.read_shapes(checkpoint, format, allow_pickle)


def native_model(
    checkpoint: str,
    name: Optional[str] = None,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    architecture: Optional[Dict[str, Any]] = None,
    strict_name: bool = True,
    name_flag: str = "name=",
    format: str = "auto",  # pylint: disable=redefined-builtin
    allow_pickle: bool = False) -> NativeModel:
  """The network `checkpoint` holds, as timm defines it.

  Args:
    checkpoint: a timm state dict (.safetensors, .pth, a Google .npz).
    name: the timm model name; needed without a card beside the file.
    mean, std: the normalisation to use where no card gives one (the
      caller's explicit choice); None: timm's for the name.
    architecture: other keywords for the model without a card (e.g. a
      config's embed_dim, depth, num_heads); the sizes the weights fix are
      taken from the weights, whatever these say.
    strict_name: a `name` that differs from the card's is an error; else
      the card wins (the caller logs it).
    name_flag: how the caller passes the name, for the errors.
    format, allow_pickle: as `pretrained.load`.

  Raises:
    UserError: a malformed card, no name without a card, a name with no
      known pre-processing and no mean/std, a file that is not a timm
      checkpoint of the name.
  """
  card_path = card_beside(checkpoint)
  if card_path is not None:
    card_name, kwargs, card_mean, card_std = _read_card(card_path, name_flag)
    if strict_name and name is not None and name != card_name:
      raise UserError(f"{name_flag.rstrip('=')}={name!r}, but {card_path} says "
                      f"the weights are a {card_name!r}: drop "
                      f"{name_flag.rstrip('=')} or move the card away")
    models.model_defaults(card_name)  # a known name, else one line
    kwargs.update(mean=card_mean, std=card_std)
    kwargs.setdefault("img_size", models.model_defaults(card_name)["img_size"])
    return NativeModel(card_name, kwargs, f"the model card {card_path}",
                       _known_preprocessing(card_name))
  if name is None:
    raise UserError(f"no {CARD} beside {checkpoint}: pass {name_flag} (the "
                    "timm model name, e.g. 'deit_tiny_patch16_224')")
  shapes = _timm_shapes(checkpoint, format, allow_pickle)
  sizes = sizes_from_shapes(shapes, name, checkpoint)
  kwargs = {
      k: v
      for k, v in (architecture or {}).items()
      if v is not None and k not in SIZE_KEYWORDS + ("mean", "std")
  }
  defaults = models.model_defaults(name)
  kwargs.update({  # a window as the name's needs no keyword
      k: v for k, v in sizes.items() if k != "window_size" or v != defaults[k]
  })
  kwargs.setdefault("img_size", defaults["img_size"])
  if mean is not None and std is not None:
    kwargs.update(mean=tuple(mean), std=tuple(std))
    stats_from = "the config's data.mean/std"
    prep = _known_preprocessing(name)
  else:
    prep = preprocessing.timm_preprocessing(name)
    kwargs.update(mean=prep.mean, std=prep.std)
    stats_from = f"timm's pre-processing of {name}"
  return NativeModel(name, kwargs,
                     f"the weights' shapes, the name {name} and {stats_from}",
                     prep)

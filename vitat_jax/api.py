"""A trained model in one call: from a run's workdir, or from a weights file.

    run = vitat_jax.load_run("runs/x")              # its newest checkpoint
    logits = run.logits_fn(images)  # float [0, 1] NHWC pixels, [N, S, S, 3]
    x_adv = attacks.pgd(run.logits_fn, key, images, labels, eps=8 / 255,
                        alpha=2 / 255, steps=20)
    exported = vitat_jax.load_model("runs/x/export/model.safetensors")

Neither loads, lists or decodes a data set: what the model takes from its
data (image size, class count, normalisation) comes from what the run or
the export recorded, else from the weights' shapes and the config (each
function's docstring says the order; the log says which was used).
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from vitat_jax import checkpointing
from vitat_jax import models
from vitat_jax import pretrained
from vitat_jax import state as state_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import sources
from vitat_jax.errors import UserError
from vitat_jax.pretrained import naming
from vitat_jax.pretrained import native


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model with its params, ready to evaluate or attack.

  Attributes:
    model: the Flax module (`vitat_jax.models`); it normalises inside.
    params: its params (on the first device).
    config: the run's config (`load_run`), or None (`load_model`).
    inputs: `state.ModelInputs` (image_size, num_classes, mean, std).
    source: where the params came from (a checkpoint step or a file).
    inputs_source: where `inputs` came from.
    logits_fn: jitted `images -> logits`, images float [0, 1], NHWC, of
      the model's image size; the `logits_fn` that `vitat_jax.attacks`
      take.
  """
  model: Any
  params: Any
  config: Optional[ml_collections.ConfigDict]
  inputs: state_lib.ModelInputs
  source: str
  inputs_source: str
  logits_fn: Callable[[Any], jax.Array]


def _logits_fn(model, params) -> Callable[[Any], jax.Array]:
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  want = (model.img_size, model.img_size, 3)

  def logits_fn(images):
    if tuple(images.shape[1:]) != want or len(images.shape) != 4:
      raise UserError(f"images of shape {tuple(images.shape)}: the model "
                      f"takes [N, {want[0]}, {want[1]}, 3] float pixels in "
                      "[0, 1] (NHWC)")
    return apply(params, jnp.asarray(images, jnp.float32))

  return logits_fn


def _abstract_params(model):
  """The model's params as shapes, traced without computing anything."""
  images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3),
                                jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _loaded(model, params, config, inputs, source, inputs_source) -> Loaded:
  return Loaded(model=model,
                params=params,
                config=config,
                inputs=inputs,
                source=source,
                inputs_source=inputs_source,
                logits_fn=_logits_fn(model, params))


# ------------------------------------------------------------- load_run ---


def _image_size_from_shapes(config, shapes) -> Optional[int]:
  """The image side that the position embedding's length and the patch
  kernel give (ViT, DeiT, ConViT), else None (Swin has no such table)."""
  if "pos_embed" not in shapes or "patch_embed" not in shapes:
    return None
  patch = shapes["patch_embed"]["kernel"].shape[0]
  tokens = shapes["pos_embed"].shape[1]
  if naming.family(models.create(config.model.name)) == "vit":
    tokens -= 1 + ("dist_token" in shapes)  # the class (and distillation)
  grid = math.isqrt(tokens)
  return grid * patch if grid * grid == tokens else None


def _num_classes_from_shapes(shapes) -> int:
  head = shapes["head"]
  return int((head["fc"] if "fc" in head else head)["kernel"].shape[-1])


def _inferred_inputs(config, shapes, image_size: Optional[int]):
  """(ModelInputs, where they came from) of a run that did not record them
  (trained before 2026-12-05)."""
  data = config.data
  size_from = "the position embedding"
  if _image_size_from_shapes(config, shapes) is not None:
    image_size = _image_size_from_shapes(config, shapes)
  elif image_size:
    size_from = "image_size="
  else:
    image_size = config.model.get("img_size") or data.get("image_size")
    size_from = "the config"
    if not image_size and data.get("name") == "digits":
      image_size, size_from = sources.DIGITS_DEFAULT_SIZE, "the digits' default"
    if not image_size:
      raise UserError("the run records no image size (model.img_size and "
                      "data.image_size are unset) and its model has no "
                      "position embedding to read it from: pass "
                      "image_size= to load_run")
  mean, std = data.get("mean"), data.get("std")
  stats_from = "the config's data.mean/std"
  if not mean or not std:
    mean, std = sources.source_default_stats(data)
    stats_from = f"the default statistics of data {data.get('name')!r}"
  inputs = state_lib.ModelInputs(int(image_size),
                                 _num_classes_from_shapes(shapes), tuple(mean),
                                 tuple(std))
  return inputs, (f"inferred: classes from the head, image size from "
                  f"{size_from}, normalisation from {stats_from}")


def _steps_to_try(workdir: str, step: Optional[int]):
  saved = workdir_lib.saved_steps(workdir)
  if not saved:
    raise UserError(f"no checkpoint in {workdir_lib.checkpoints_dir(workdir)}"
                    ": pass the workdir of a trained run")
  if step is None:
    return saved
  if step not in saved:
    raise UserError(f"no checkpoint of step {step} in {workdir}: its saved "
                    f"steps are {', '.join(map(str, sorted(saved)))}")
  return [step]


def load_run(workdir: str,
             step: Optional[int] = None,
             *,
             defaults=None,
             image_size: Optional[int] = None,
             weights: str = "auto") -> Loaded:
  """A training run's model and params, from its workdir alone.

  Args:
    workdir: a run's directory (local or `gs://`).
    step: the checkpoint's step; None: the newest readable one (an
      unreadable newer one is skipped with a warning).
    weights: "auto" (the params' moving average when the run kept one,
      as its evaluations used, else the params), "ema" or "raw".
    defaults: a config of today's schema (e.g. `configs.default.get_config()`
      from a checkout) whose fields fill those the run's config lacks,
      as `--mode=eval` completes it; without it, the recorded config with
      `workdir.upgrade_run_config`'s fields (enough for the model).
    image_size: only for a run that records none and whose model has no
      position embedding (a Swin trained before 2026-12-05 with
      data.image_size unset).

  Returns:
    `Loaded` with the run's config. The model's data-dependent fields come
    from, in order: the checkpoint's `model_inputs` (runs since
    2026-12-05); else inferred: the class count from the head's kernel, the
    image size from the position embedding's length and the patch size
    (else `image_size`, the config's, the digits' 16), the normalisation
    from the config's data.mean/std, else the data set's default
    statistics (`data.sources.source_default_stats`). `inputs_source` and
    the log say which.

  Raises:
    UserError: no run in `workdir`, no such step (the error lists the saved
      ones), or no readable checkpoint.
  """
  if weights not in ("auto", "ema", "raw"):
    raise UserError(f"weights={weights!r}: use auto, ema or raw")
  steps = _steps_to_try(workdir, step)
  errors = []
  for candidate in steps:
    try:
      shapes = checkpointing.saved_param_shapes(workdir, candidate)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint of step %d in %s cannot be read (%s: %s)",
                      candidate, workdir,
                      type(e).__name__,
                      str(e)[:200])
      errors.append(candidate)
      continue
    break
  else:
    raise UserError(f"none of the checkpoints of {workdir} (steps "
                    f"{', '.join(map(str, errors))}) can be read")
  recorded, config_source = workdir_lib.recorded_config(workdir, candidate)
  if recorded is None:
    raise UserError(f"{workdir} has checkpoints but no recorded config (in "
                    f"them or in {workdir_lib.CONFIG_JSON}): it is not a run "
                    "of this library")
  if defaults is not None:
    recorded = workdir_lib.merge_run_config(
        dict(defaults.to_dict() if hasattr(defaults, "to_dict") else defaults),
        recorded)
  config = ml_collections.ConfigDict(recorded)
  meta = workdir_lib.meta_of_step(workdir, candidate) or {}
  if isinstance(meta.get(workdir_lib.MODEL_INPUTS), dict):
    inputs = state_lib.ModelInputs.from_dict(meta[workdir_lib.MODEL_INPUTS])
    inputs_source = "recorded by the run"
  else:
    inputs, inputs_source = _inferred_inputs(config, shapes, image_size)
  eval_dtype = config.get("eval", {}).get("compute_dtype")
  model = state_lib.build_model(config,
                                inputs=inputs,
                                compute_dtype=eval_dtype or None)
  expected = jax.tree.map(lambda s: s.shape, _abstract_params(model))
  if expected != jax.tree.map(lambda s: s.shape, shapes):
    raise UserError(f"the checkpoint of step {candidate} in {workdir} does "
                    f"not hold the params of the model its config describes "
                    f"({config.model.name}, {inputs_source}): pass "
                    "defaults= or image_size=, or load the export instead")
  item = "params"
  if weights != "raw" and checkpointing.saved_param_shapes(
      workdir, candidate, "ema_params") is not None:
    item = "ema_params"  # the run averaged its params: what it evaluated
  elif weights == "ema":
    raise UserError(f"the checkpoint of step {candidate} in {workdir} holds "
                    "no EMA params (the run had ema.decay=0): pass "
                    "weights='raw'")
  params = checkpointing.restore_saved_params(workdir, candidate, shapes, item)
  source = f"{workdir_lib.checkpoints_dir(workdir)} step {candidate}"
  if item == "ema_params":
    source += " (EMA weights)"
  logging.info(
      "loaded %s (config from %s); model inputs %s: image size %d, %d "
      "classes, mean %s, std %s", source, config_source, inputs_source,
      inputs.image_size, inputs.num_classes, inputs.mean, inputs.std)
  return _loaded(model, params, config, inputs, source, inputs_source)


# ----------------------------------------------------------- load_model ---


def load_model(checkpoint: str, name: Optional[str] = None) -> Loaded:
  """A model and its params from a timm-format weights file.

  Args:
    checkpoint: a timm state dict (`.safetensors`; `.pth` only without
      pickled objects; a Google `.npz`), e.g. `--mode=export`'s
      `<workdir>/export/model.safetensors`.
    name: the timm model name; needed when no `model_card.json` (the
      export's) lies beside the file, else it must agree with the card.

  Returns:
    `Loaded` (config None). With a card: its timm name and keywords and
    its normalisation. Without: `name`'s timm keywords with the class count
    read from the head's weights (and, for ViT/DeiT/ConViT, the patch and
    image size from the patch kernel and the position embedding), and the
    normalisation of timm's pre-processing for `name`
    (`pretrained.preprocessing`'s table: ImageNet's mean/std for DeiT,
    ConViT and Swin, 0.5/0.5 for timm's ViT). `pretrained.native` reads
    them; `--mode=eval` of an external checkpoint uses the same.

  Raises:
    UserError: a missing or malformed file or card, no `name` without a
      card, or weights that are not those of the model (nothing is
      re-initialised or silently dropped).
  """
  spec = native.native_model(checkpoint, name)
  name, inputs_source = spec.name, spec.source
  model = models.create(name, **spec.kwargs)
  # Abstract init params: anything `load` would re-initialise stays a shape.
  params = pretrained.load(checkpoint,
                           model,
                           init_params=_abstract_params(model))
  missing = [
      "/".join(str(getattr(k, "key", k))
               for k in path)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if isinstance(leaf, jax.ShapeDtypeStruct)
  ]
  if missing:
    raise UserError(f"{checkpoint} does not hold {', '.join(missing[:3])} of "
                    f"{name}: pass the name (or card) of the model it was "
                    "saved from")
  params = jax.device_put(params, jax.devices()[0])
  inputs = state_lib.model_inputs(model)
  logging.info(
      "loaded %s as %s; model inputs from %s: image size %d, %d classes, "
      "mean %s, std %s", checkpoint, name, inputs_source, inputs.image_size,
      inputs.num_classes, inputs.mean, inputs.std)
  return _loaded(model, params, None, inputs, checkpoint, inputs_source)

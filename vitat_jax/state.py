"""The train state of a config: the model, the state's shapes, its init.

    model = state.build_model(config, splits)
    abstract = state.abstract_state(model, tx, config.seed)   # no compile
    train_state = state.initial_state(config, model, tx, init_key)

`TrainState` is what the jitted step (`train_step.py`) carries and what a
run checkpoint (`checkpointing.py`, orbax) saves: this module knows nothing
of files, so the step depends on JAX, Flax and optax only. The run's keys
(`run_keys`) are functions of its seed.
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from absl import logging

from vitat_jax import pretrained
from vitat_jax import models
from vitat_jax import parallel
from vitat_jax.models import precision


@flax.struct.dataclass
class TrainState:
  """What a step carries and a checkpoint saves. `ema_params` is None unless
  the run averages its params (`ema.decay` > 0): a run without EMA has the
  same tree, and the same checkpoints, as before EMA existed."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def ema_decay(config, step):
  """The EMA decay of update `step` (0-based): `ema.decay`, or with
  `ema.warmup` min(decay, (1 + step) / (10 + step))."""
  decay = jnp.asarray(config.ema.decay, jnp.float32)
  if config.ema.warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def update_ema(ema_params, params, decay):
  """decay * ema + (1 - decay) * params, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params,
                      params)


def evaluated_weights(config) -> str:
  """"ema" or "raw": the weights `eval.weights` asks for ("auto": the EMA
  params when the run keeps them)."""
  if config.eval.weights == "auto":
    return "ema" if config.ema.decay > 0 else "raw"
  return config.eval.weights


def evaluated_params(config, state):
  """The params of `state` that the evaluations use (`evaluated_weights`)."""
  if evaluated_weights(config) == "ema":
    return state.ema_params
  return state.params


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """What a model takes from its data: the image side, the class count and
  the input normalisation (the model normalises [0, 1] pixels inside)."""
  image_size: int
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  def as_dict(self) -> dict:
    return {
        "image_size": int(self.image_size),
        "num_classes": int(self.num_classes),
        "mean": [float(m) for m in self.mean],
        "std": [float(s) for s in self.std]
    }

  @classmethod
  def from_dict(cls, value: dict) -> "ModelInputs":
    return cls(image_size=int(value["image_size"]),
               num_classes=int(value["num_classes"]),
               mean=tuple(float(m) for m in value["mean"]),
               std=tuple(float(s) for s in value["std"]))


def model_inputs(model) -> ModelInputs:
  """The `ModelInputs` a built model was made for (what a run records)."""
  return ModelInputs(model.img_size, model.num_classes, model.mean, model.std)


def build_model(config,
                splits=None,
                inputs: Optional[ModelInputs] = None,
                compute_dtype: Optional[str] = None):
  """The model for `config`, sized and normalised for the data (`splits`,
  or the `inputs` a run recorded).

  Params are created (and optimised) in float32 whatever
  `config.compute_dtype` (checked by `validate.check_config`; "auto" is
  `parallel.compute_dtype_for`'s choice; `compute_dtype` overrides it);
  float32 dots run at `config.matmul_precision`
  (`precision.matmul_precision_for`).
  """
  data_kwargs = {"img_size": config.data.image_size or None}
  if splits is not None:
    data_kwargs = dict(img_size=config.data.image_size or splits.image_size,
                       num_classes=splits.num_classes,
                       mean=splits.mean,
                       std=splits.std)
  if inputs is not None:
    data_kwargs = dict(img_size=inputs.image_size,
                       num_classes=inputs.num_classes,
                       mean=inputs.mean,
                       std=inputs.std)
  dtype = parallel.compute_dtype_for(compute_dtype or config.compute_dtype)
  data_kwargs["dtype"] = jnp.dtype(dtype)
  data_kwargs["precision"] = precision.matmul_precision_for(
      config.matmul_precision, dtype)
  return models.create_from_config(config.model, **data_kwargs)


def run_keys(seed: int):
  """(init, training loop, evaluation) keys of a run."""
  return jax.random.split(jax.random.key(seed), 3)


def _dummy_images(model, shape_only: bool = False):
  shape = (1, model.img_size, model.img_size, 3)
  if shape_only:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  return jnp.zeros(shape, jnp.float32)


def abstract_state(model, tx, seed: int, *, ema: bool = False) -> TrainState:
  """The train state's shapes and dtypes, traced without compiling (with
  `ema`, the params' average too)."""
  params = jax.eval_shape(model.init,
                          jax.eval_shape(lambda: jax.random.key(seed)),
                          _dummy_images(model, shape_only=True))["params"]
  return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                    jax.eval_shape(tx.init, params), params if ema else None)


def initial_params(config, model, key, *, warn_resampling: bool = False):
  """Random params, replaced by `config.init.checkpoint`'s where set (a
  timm / npz / exported file, resampled to the model; a new head)."""
  params = jax.jit(model.init)(key, _dummy_images(model))["params"]
  if config.init.checkpoint:
    params = pretrained.load(config.init.checkpoint,
                             model,
                             init_params=params,
                             format=config.init.format,
                             allow_pickle=config.init.allow_pickle,
                             warn_resampling=warn_resampling)
    logging.info("initialised from %s", config.init.checkpoint)
  return params


def checkpoint_params(config, model, *, warn_resampling: bool = False):
  """`config.init.checkpoint`'s params for `model`, for evaluation: mapped
  (resampled where the model's sizes differ), nothing compiled; a tensor it
  would have to re-initialise (another class count) stays a shape, which
  `setup.prepare` has refused before."""
  abstract = jax.eval_shape(model.init,
                            jax.eval_shape(lambda: jax.random.key(0)),
                            _dummy_images(model, shape_only=True))["params"]
  return pretrained.load(config.init.checkpoint,
                         model,
                         init_params=abstract,
                         format=config.init.format,
                         allow_pickle=config.init.allow_pickle,
                         warn_resampling=warn_resampling)


def initial_state(config, model, tx, key) -> TrainState:
  """Step 0: `initial_params` and a fresh optimiser state."""
  params = initial_params(config, model, key)
  ema = jax.tree.map(jnp.copy, params) if config.ema.decay > 0 else None
  return TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params), ema)

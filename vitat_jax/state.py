"""The train state of a config: model, optimiser, init, save and restore.

Shared by training (`train.py`) and `--mode=eval` (`eval_only.py`):

    model = state.build_model(config, splits)
    tx, schedule, steps_per_epoch = state.make_optimizer(config, splits)
    abstract = state.abstract_state(model, tx, config.seed)   # no compile
    mngr = state.checkpoint_manager(workdir, max_to_keep=3)
    train_state, step, meta = state.restore_latest(mngr, abstract)
    if train_state is None:
      train_state = state.initial_state(config, model, tx, init_key)
    # or, placed on a mesh: state.restore_or_init(config, workdir, ...)
    state.save_checkpoint(mngr, step, train_state, meta)   # asynchronous

Nothing compiles before the restore is decided: a run whose checkpoints are
all unreadable is refused on shapes alone.

Checkpoints are orbax's, in `<workdir>/checkpoints/<step>`, with two items:
`state` (step, params, optimiser state) and `meta` (JSON: the seed, the
input pipeline's position, the resolved config). Nothing else is needed to
resume exactly: the data order, the augmentation and the attack randomness
(ARD/PRM masks included) are functions of the seed and the step. Orbax
writes each step into a temporary directory and renames it when complete,
so a half-written step is never taken for a good one; an unreadable step
is skipped with a warning in favour of the previous one.
"""

import shutil
import time
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vitat_jax import checkpoints
from vitat_jax import models
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import pipeline
from vitat_jax.errors import UserError
from vitat_jax.models import precision


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def build_model(config, splits=None):
  """The model for `config`, sized and normalised for the data.

  Params are created (and optimised) in float32 whatever
  `config.compute_dtype` (checked by `validate.check_config`; "auto" is
  `parallel.compute_dtype_for`'s choice); float32 dots run at
  `config.matmul_precision` (`precision.matmul_precision_for`).
  """
  data_kwargs = {"img_size": config.data.image_size or None}
  if splits is not None:
    data_kwargs = dict(img_size=config.data.image_size or splits.image_size,
                       num_classes=splits.num_classes,
                       mean=splits.mean,
                       std=splits.std)
  dtype = parallel.compute_dtype_for(config.compute_dtype)
  data_kwargs["dtype"] = jnp.dtype(dtype)
  data_kwargs["precision"] = precision.matmul_precision_for(
      config.matmul_precision, dtype)
  return models.create_from_config(config.model, **data_kwargs)


def make_optimizer(config, splits):
  """(optax chain, lr schedule, steps per epoch) for training on `splits`."""
  steps_per_epoch = pipeline.steps_per_epoch(len(splits.train),
                                             config.batch_size)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                      steps_per_epoch)
  return tx, schedule, steps_per_epoch


def run_keys(seed: int):
  """(init, training loop, evaluation) keys of a run."""
  return jax.random.split(jax.random.key(seed), 3)


def _dummy_images(model, shape_only: bool = False):
  shape = (1, model.img_size, model.img_size, 3)
  if shape_only:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  return jnp.zeros(shape, jnp.float32)


def abstract_state(model, tx, seed: int) -> TrainState:
  """The train state's shapes and dtypes, traced without compiling."""
  params = jax.eval_shape(model.init,
                          jax.eval_shape(lambda: jax.random.key(seed)),
                          _dummy_images(model, shape_only=True))["params"]
  return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                    jax.eval_shape(tx.init, params))


def initial_params(config, model, key):
  """Random params, replaced by `config.init.checkpoint`'s where set (a
  timm / npz / exported file, resampled to the model; a new head)."""
  params = jax.jit(model.init)(key, _dummy_images(model))["params"]
  if config.init.checkpoint:
    params = checkpoints.load(config.init.checkpoint,
                              model,
                              init_params=params,
                              format=config.init.format,
                              allow_pickle=config.init.allow_pickle)
    logging.info("initialised from %s", config.init.checkpoint)
  return params


def initial_state(config, model, tx, key) -> TrainState:
  """Step 0: `initial_params` and a fresh optimiser state."""
  params = initial_params(config, model, key)
  return TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params))


# ---------------------------------------------------------- checkpoints ---


def check_same_data(meta, steps_per_epoch: int, where: str) -> None:
  """The input position a checkpoint records still means the same data."""
  if meta and meta.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
    raise UserError(
        f"the training data changed since {where} was saved "
        f"({meta['steps_per_epoch']} steps per epoch then, {steps_per_epoch} "
        "now): restore the data, use a new --workdir, or pass --overwrite to "
        "start over")


def checkpoint_manager(workdir: str,
                       *,
                       max_to_keep: int = 3) -> ocp.CheckpointManager:
  """Orbax's manager of `<workdir>/checkpoints` (items `state` and `meta`)."""
  if max_to_keep < 1:  # orbax would keep none (0) or fail (< 0)
    raise UserError(f"keep_checkpoints={max_to_keep} must be >= 1")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(workdir_lib.checkpoints_dir(workdir),
                               options=options,
                               item_names=("state", "meta"))


def save_checkpoint(mngr: ocp.CheckpointManager,
                    step: int,
                    state,
                    meta: Optional[Dict[str, Any]] = None) -> None:
  """Saves asynchronously; `mngr.wait_until_finished()` before relying on it."""
  meta = dict(meta or {}, step=int(step))
  mngr.save(step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True)


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract,
    *,
    advice: str = "pass --overwrite to start the run over",
    set_aside: bool = True) -> Tuple[Any, Optional[int], Optional[dict]]:
  """(state, step, meta) of the newest readable checkpoint, or Nones.

  `advice` ends the error when none can be read; `set_aside=False` (for
  evaluation, which must not change a run) leaves unreadable steps in place.

  Raises:
    UserError: checkpoints exist but none of them can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None, None, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  unreadable = []
  for step in steps:
    try:
      restored = mngr.restore(step,
                              args=ocp.args.Composite(
                                  state=ocp.args.StandardRestore(target),
                                  meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
          "checkpoint of step %d in %s cannot be read (%s: %s); "
          "falling back to the previous one", step, mngr.directory,
          type(e).__name__,
          str(e)[:200])
      unreadable.append(step)
      continue
    if set_aside:
      _set_aside(mngr, unreadable)
    logging.info("resuming from the checkpoint of step %d in %s", step,
                 mngr.directory)
    return restored.state, step, dict(restored.meta)
  raise UserError(f"none of the checkpoints in {mngr.directory} (steps "
                  f"{', '.join(map(str, steps))}) can be read; {advice}")


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  """Moves unreadable steps out of the way (kept for inspection, not reused)."""
  if not steps:
    return
  directory = epath.Path(mngr.directory)
  aside = directory.parent / workdir_lib.UNREADABLE_CHECKPOINTS_DIR
  stamp = int(parallel.agree_value(time.time()))
  if jax.process_index() == 0:  # one mover; the other hosts wait for it
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = aside / f"{step}-{stamp}"
      _move_folder(directory / str(step), target)
      logging.warning("moved the unreadable checkpoint of step %d to %s", step,
                      target)
  parallel.barrier("unreadable checkpoints set aside")
  mngr.reload()


def _move_folder(source: epath.Path, target: epath.Path) -> None:
  """A rename where the file system has one; on an object store, a copy of
  every object, then the delete of the source."""
  if workdir_lib.is_local(str(source)):
    shutil.move(str(source), str(target))
    return
  # (No recursive glob on GCS: epath refuses it.)
  for item in source.iterdir():
    if item.is_dir():
      _move_folder(item, target / item.name)
    else:
      item.copy(target / item.name)
  source.rmtree()


def restore_or_init(config, workdir: str, model, tx, mesh,
                    steps_per_epoch: int):
  """(checkpoint manager, train state placed on `mesh`, its step, the
  state's shardings, the checkpoint's meta item ({} at step 0)): the newest
  readable checkpoint, else step 0.

  Shapes only until the restore (the keys too): a run whose checkpoints
  are all unreadable is refused before anything is compiled.
  """
  abstract = abstract_state(model, tx, config.seed)
  shardings = parallel.state_shardings(mesh,
                                       abstract,
                                       fsdp=config.fsdp,
                                       fsdp_min_size=config.fsdp_min_size)
  mngr = checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  state, start_step, meta = restore_latest(
      mngr, parallel.with_shardings(abstract, shardings))
  if state is None:
    init_key = run_keys(config.seed)[0]
    state, start_step = initial_state(config, model, tx, init_key), 0
    meta = {}
  else:
    check_same_data(meta, steps_per_epoch,
                    f"the checkpoint of step {start_step}")
  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  logging.info("model %s: %.2fM parameters", config.model.name,
               num_params / 1e6)
  state = jax.device_put(state, shardings)
  if config.fsdp:
    leaves = jax.tree.leaves(state)
    logging.info("FSDP: %d of %d state arrays split over %d devices",
                 sum(not x.sharding.is_fully_replicated for x in leaves),
                 len(leaves), mesh.devices.size)
  return mngr, state, start_step, shardings, meta

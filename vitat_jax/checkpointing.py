"""A run's checkpoints: orbax's, in `<workdir>/checkpoints/<step>`.

    mngr = checkpointing.checkpoint_manager(workdir, max_to_keep=3)
    train_state, step, meta = checkpointing.restore_latest(mngr, abstract)
    checkpointing.save_checkpoint(mngr, step, train_state, meta)  # async
    # or, placed on a mesh: checkpointing.restore_or_init(setup)
    params, where = checkpointing.restore_params(setup)  # eval, export

Each step has two items: `state` (step, params, optimiser state) and `meta`
(JSON: the seed, the input pipeline's position, the resolved config, the
metrics since the last log step). Nothing else is needed to resume exactly:
the data order, the augmentation and the attack randomness (ARD/PRM masks
included) are functions of the seed and the step. Orbax writes each step
into a temporary directory and renames it when complete, so a half-written
step is never taken for a good one; an unreadable step is skipped with a
warning in favour of the previous one. Nothing compiles before the restore
is decided: a run whose checkpoints are all unreadable is refused on shapes
alone.
"""

import shutil
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vitat_jax import model_names
from vitat_jax import parallel
from vitat_jax import state as state_lib
from vitat_jax import train_step as train_step_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError


def no_checkpoint(workdir: str) -> UserError:
  return UserError(f"no checkpoint in {workdir_lib.checkpoints_dir(workdir)}:"
                   " train first, or pass --config.init.checkpoint=FILE")


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
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(workdir_lib.checkpoints_dir(workdir),
                               options=options,
                               item_names=("state", "meta"))


def _saved_tree(state):
  """What a checkpoint's `state` item holds: a TrainState's fields as a
  dict, without `ema_params` when the run keeps none, so that a run without
  EMA saves and restores exactly what runs saved before EMA existed."""
  if not isinstance(state, state_lib.TrainState):
    return state
  tree = {
      "step": state.step,
      "params": state.params,
      "opt_state": state.opt_state
  }
  if state.ema_params is not None:
    tree["ema_params"] = state.ema_params
  return tree


def _train_state(tree, like):
  """`tree` back as a TrainState when `like` (the target) is one."""
  if not isinstance(like, state_lib.TrainState):
    return tree
  return state_lib.TrainState(tree["step"], tree["params"], tree["opt_state"],
                              tree.get("ema_params"))


def save_checkpoint(mngr: ocp.CheckpointManager,
                    step: int,
                    state,
                    meta: Optional[Dict[str, Any]] = None) -> None:
  """Saves asynchronously; `mngr.wait_until_finished()` before relying on it."""
  meta = dict(meta or {}, step=int(step))
  mngr.save(step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(
                _saved_tree(state)),
                                    meta=ocp.args.JsonSave(meta)),
            force=True)


def should_save(done: int, *, total: int, steps_per_epoch: int, config,
                stopping: bool, clock_due: bool) -> bool:
  """Whether the step `done` ends with a checkpoint: the last step, every
  `checkpoint_every_steps`, the epoch ends `checkpoint_every_epochs` asks
  for, a stop (a signal) and `checkpoint_every_minutes` (`clock_due`)."""
  every_epochs = config.checkpoint_every_epochs
  epoch_end = (bool(every_epochs) and done % steps_per_epoch == 0 and
               (done // steps_per_epoch) % every_epochs == 0)
  return (done == total or done % config.checkpoint_every_steps == 0 or
          stopping or epoch_end or clock_due)


def minutes_passed(config, last_save: float) -> bool:
  """Whether `checkpoint_every_minutes` passed since `last_save`, by process
  0's clock (asked at log steps only: one decision for all hosts)."""
  minutes = config.checkpoint_every_minutes
  return bool(minutes) and parallel.agree(time.monotonic() - last_save >= 60 *
                                          minutes)


def save_run(mngr: ocp.CheckpointManager,
             step: int,
             state,
             config,
             steps_per_epoch: int,
             history,
             flush=lambda: None,
             model=None) -> None:
  """A training run's asynchronous checkpoint of `step`, never of non-finite
  metrics, with its meta: the seed, the input position, the config and the
  metrics since the last log step (`history`), so the first log record
  after a resume averages the same steps, and the `model`'s data-dependent
  fields (`state.ModelInputs`, for `vitat_jax.load_run`). `flush` runs first (TensorBoard's
  events as far as the checkpoint: a resumed run's curves have no gap)."""
  flush()
  pending = []
  if history:
    train_step_lib.check_finite(train_step_lib.mean_metrics(history), step,
                                config)
    pending = [{
        k: float(v) for k, v in m.items()
    } for m in jax.device_get(history)]
  spe = steps_per_epoch
  meta = {
      "seed": config.seed,
      "steps_per_epoch": spe,
      "epoch": step // spe,
      "index_in_epoch": step % spe,
      "config": workdir_lib.config_as_dict(config),
      "pending_metrics": pending
  }
  if model is not None:
    meta[workdir_lib.MODEL_INPUTS] = state_lib.model_inputs(model).as_dict()
  save_checkpoint(mngr, step, state, meta=meta)


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
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_tree(abstract))
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
    return _train_state(restored.state, abstract), step, dict(restored.meta)
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


def restore_or_init(setup):
  """(checkpoint manager, train state placed on the mesh, its step, the
  state's shardings, the checkpoint's meta item ({} at step 0)) of a
  `setup.Setup`: the newest readable checkpoint, else step 0.

  Shapes only until the restore (the keys too): a run whose checkpoints
  are all unreadable is refused before anything is compiled.
  """
  config, mesh, model = setup.config, setup.mesh, setup.model
  abstract = state_lib.abstract_state(model,
                                      setup.tx,
                                      config.seed,
                                      ema=config.ema.decay > 0)
  shardings = parallel.state_shardings(mesh,
                                       abstract,
                                       fsdp=config.fsdp,
                                       fsdp_min_size=config.fsdp_min_size)
  mngr = checkpoint_manager(setup.workdir, max_to_keep=config.keep_checkpoints)
  state, start_step, meta = restore_latest(
      mngr, parallel.with_shardings(abstract, shardings))
  if state is None:
    init_key = state_lib.run_keys(config.seed)[0]
    state = state_lib.initial_state(config, model, setup.tx, init_key)
    start_step, meta = 0, {}
  else:
    check_same_data(meta, setup.steps_per_epoch,
                    f"the checkpoint of step {start_step}")
  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  logging.info("model %s: %.2fM parameters", model_names.label(config),
               num_params / 1e6)
  state = jax.device_put(state, shardings)
  if config.fsdp:
    leaves = jax.tree.leaves(state)
    logging.info("FSDP: %d of %d state arrays split over %d devices",
                 sum(not x.sharding.is_fully_replicated for x in leaves),
                 len(leaves), mesh.devices.size)
  return mngr, state, start_step, shardings, meta


def restore_params(setup) -> Tuple[Any, str]:
  """(params, where they came from) of the newest readable checkpoint of
  `setup.workdir`, for evaluation and export (nothing set aside): the EMA
  params or the raw ones, as `eval.weights` chooses
  (`state.evaluated_weights`)."""
  config = setup.config
  mngr = checkpoint_manager(setup.workdir, max_to_keep=config.keep_checkpoints)
  abstract = state_lib.abstract_state(setup.model,
                                      setup.tx,
                                      config.seed,
                                      ema=config.ema.decay > 0)
  steps = workdir_lib.saved_steps(setup.workdir)
  if steps:
    _check_saved_shapes(setup.workdir, steps[0], abstract.params)
  if workdir_lib.is_locked(setup.workdir):
    advice = (f"the run in it is still training "
              f"({workdir_lib.holder(setup.workdir) or 'its lock is held'}) "
              "and may be writing or deleting them: rerun --mode=eval after "
              "its next checkpoint, or when it has finished")
  else:
    advice = ("evaluate them with the config they were trained with (that "
              "run's --config and --config.* flags), or pass "
              "--config.init.checkpoint=FILE")
  state, step, _ = restore_latest(mngr,
                                  abstract,
                                  set_aside=False,
                                  advice=advice)
  if state is None:
    raise no_checkpoint(setup.workdir)
  weights = state_lib.evaluated_weights(config)
  where = (f"{workdir_lib.checkpoints_dir(setup.workdir)} step {step}"
           f"{' (EMA weights)' if weights == 'ema' else ''}")
  params = state_lib.evaluated_params(config, state)
  _check_finite(params, where)
  return params, where


def _check_saved_shapes(workdir: str, step: int, abstract_params) -> None:
  """A one-line error, before the restore, for a checkpoint whose params
  have other shapes than the model built now (a head of another class count:
  the data changed since training). Evaluation never makes a new head."""
  try:
    saved = saved_param_shapes(workdir, step)
  except Exception:  # pylint: disable=broad-except
    return  # unreadable metadata: the restore says which step fails
  if not saved:
    return
  saved, wanted = workdir_lib.flatten(saved), workdir_lib.flatten(
      abstract_params)
  for name, want in wanted.items():
    have = saved.get(name)
    if have is None or tuple(have.shape) == tuple(want.shape):
      continue
    what = (f"a head of {have.shape[-1]} classes and the data now has "
            f"{want.shape[-1]}" if name.startswith("head.") else
            f"{name} of shape {tuple(have.shape)} where the model built now "
            f"has {tuple(want.shape)}")
    raise UserError(
        f"the checkpoint of step {step} in {workdir_lib.checkpoints_dir(workdir)}"
        f" has {what}: evaluate it on the data and model it was trained with "
        "(that run's data.* and model.* settings); evaluation never makes a "
        "new head")


def _check_finite(params, where: str) -> None:
  """A one-line error for params holding NaN or infinite values (read on
  the host: nothing is compiled), before any evaluation or export."""
  for name, value in workdir_lib.flatten(params).items():
    if isinstance(value, jax.Array):  # this host's copy (replicated params)
      value = value.addressable_data(0)
    finite = np.isfinite(np.asarray(value, np.float32))
    if not finite.all():
      raise UserError(f"the checkpoint {where} holds {int((~finite).sum())} "
                      f"NaN or infinite values in {name}: it is not evaluated;"
                      " restore the file, or retrain")


def _state_item(workdir: str, step: int) -> str:
  return str(
      epath.Path(workdir_lib.checkpoints_dir(workdir)) / str(step) / "state")


def saved_param_shapes(workdir: str, step: int, item: str = "params"):
  """The shapes and dtypes (`jax.ShapeDtypeStruct`s) of the params ("params")
  or of their moving average ("ema_params") that the checkpoint of `step`
  holds, from orbax's metadata (no array is read); None if it has none."""
  metadata = ocp.PyTreeCheckpointer().metadata(_state_item(workdir, step))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if not tree.get(item):
    return None
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                      tree[item])


def restore_saved_params(workdir: str,
                         step: int,
                         abstract_params,
                         item: str = "params"):
  """The params ("params", or "ema_params": their moving average) of the
  checkpoint of `step` alone (the optimiser state is not read), shaped as
  `abstract_params`, on the first device."""
  target = {item: abstract_params}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = ocp.PyTreeCheckpointer().restore(
      _state_item(workdir, step),
      args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=jax.tree.map(
              lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target),
          partial_restore=True))
  return restored[item]

"""The training loop: one jitted, state-donating step; evaluation; checkpoints.

`train_and_evaluate(config, workdir)` is what `main.py` calls: it validates
the config, loads the data, builds the model and optimiser, resumes from the
latest checkpoint in `workdir` if there is one, trains, evaluates clean and
robust accuracy on a fixed test subset after every epoch, and finally writes
`metrics.json` with the full evaluation.
"""

import contextlib
import functools
import json
import math
import os
import shutil
import time
from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vitat_jax import checkpoints
from vitat_jax import data as data_lib
from vitat_jax import evaluation
from vitat_jax import masks
from vitat_jax import metric_writers
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import preemption
from vitat_jax import progress as progress_lib
from vitat_jax import report
from vitat_jax import run_checkpoints
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import augment
from vitat_jax.data import mixup
from vitat_jax.data import pipeline
from vitat_jax.data import randaugment
from vitat_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def build_model(config, splits=None):
  """The model for `config`, sized and normalised for the data."""
  data_kwargs = {"img_size": config.data.image_size or None}
  if splits is not None:
    data_kwargs = dict(img_size=config.data.image_size or splits.image_size,
                       num_classes=splits.num_classes, mean=splits.mean,
                       std=splits.std)
  # Params are created (and optimised) in float32 whatever the compute dtype.
  compute_dtype = config.get("compute_dtype", "float32")
  if compute_dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"compute_dtype={compute_dtype!r}: use float32, bfloat16 "
                    "(GPU/TPU) or float16")
  data_kwargs["dtype"] = jnp.dtype(compute_dtype)
  return models.create_from_config(config.model, **data_kwargs)


def _abstract_state(model, tx, seed: int) -> "TrainState":
  """The train state's shapes and dtypes, traced without compiling."""
  params = jax.eval_shape(
      model.init, jax.eval_shape(lambda: jax.random.key(seed)),
      jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3),
                           jnp.float32))["params"]
  return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                    jax.eval_shape(tx.init, params))


def accumulate_gradients(grad_fn, params, batch, key, r, accum_steps: int):
  """Mean gradient and metrics of `grad_fn` over `accum_steps` micro-batches.

  As the reference's --accum-steps: each micro-batch contributes the
  gradient of loss / accum_steps, and the optimiser (clipping included)
  then steps once on the sum. Micro-batch m holds rows m, m + A, m + 2A, ...
  so that each device keeps its own rows of a batch-sharded array.
  Micro-batch m uses the key `fold_in(key, m)`. (The reference calls
  `opt.zero_grad()` before every micro-batch's backward, so there only the
  last micro-batch's gradient survives; this is the documented intent.)
  """
  def split(a):
    a = a.reshape(a.shape[0] // accum_steps, accum_steps, *a.shape[1:])
    return jnp.swapaxes(a, 0, 1)

  def body(total, inputs):
    index, micro_batch = inputs
    (_, metrics), grads = grad_fn(params, micro_batch,
                                  jax.random.fold_in(key, index), r)
    return jax.tree.map(jnp.add, total, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  total, metrics = jax.lax.scan(
      body, zeros, (jnp.arange(accum_steps), jax.tree.map(split, batch)))
  grads = jax.tree.map(lambda g: g / accum_steps, total)
  return grads, jax.tree.map(lambda m: m.mean(axis=0), metrics)


def make_train_step(config, model, objective, tx, schedule,
                    steps_per_epoch: int, num_classes: int):
  """`train_step(state, images_uint8, labels, loop_key) -> (state, metrics)`."""
  padding = config.augment.crop_padding
  flip = config.augment.flip
  mix = config.mixup
  # As in the reference, Mixup/CutMix feed PGD-AT (and natural) batches;
  # TRADES and MART train on the plain labels.
  use_mixup = mix.prob > 0 and config.method in ("at", "natural")
  accum_steps = config.get("accum_steps", 1)
  randaugment_spec = config.augment.get("randaugment", "")

  def train_step(state, images, labels, loop_key):
    step_key = jax.random.fold_in(loop_key, state.step)
    augment_key, mixup_key, objective_key = jax.random.split(step_key, 3)
    x = augment.to_float(images)
    if randaugment_spec:
      augment_key, randaugment_key = jax.random.split(augment_key)
    if padding or flip:
      x = augment.random_crop_flip(augment_key, x, padding=padding, flip=flip)
    if randaugment_spec:
      x = randaugment.randaugment(randaugment_key, x, randaugment_spec)
    if use_mixup:
      x, targets = mixup.mixup_cutmix(
          mixup_key, x, labels, num_classes, mixup_alpha=mix.mixup_alpha,
          cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
          switch_prob=mix.switch_prob, label_smoothing=mix.label_smoothing)
    else:
      targets = mixup.smooth_one_hot(labels, num_classes, mix.label_smoothing)
    batch = {"image": x, "target": targets}
    t = masks.fractional_epoch(state.step, steps_per_epoch)
    r = masks.warmup_value(t, config.warmup_epochs, config.drop_rate)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, objective_key, r)
    else:
      grads, metrics = accumulate_gradients(grad_fn, state.params, batch,
                                            objective_key, r, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   lr=schedule(state.step), r=r)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def _mean_metrics(history):
  host = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(metrics, step, config):
  for name in ("loss", "grad_norm"):
    if not math.isfinite(metrics[name]):
      hint = (" (gradient clipping is off: set optim.grad_clip=1.0)"
              if config.optim.grad_clip <= 0 else
              " (check the data for NaN/Inf, or lower optim.lr)")
      raise FloatingPointError(
          f"non-finite {name}={metrics[name]} at step {step}{hint}; the last "
          "good checkpoint is kept")


def format_table(result: Dict[str, Any], attack_names) -> str:
  rows = [("attack", "accuracy")]
  rows += [(n, f"{100 * result[f'{n}_acc']:.2f}%") for n in attack_names]
  width = max(len(r[0]) for r in rows) + 2
  lines = [f"{a:<{width}}{b:>10}" for a, b in rows]
  lines.insert(1, "-" * (width + 10))
  lines.append(f"({result['num_eval_images']} test images, eps "
               f"{result['eps'] * 255:.1f}/255)")
  return "\n".join(lines)


def run_final_evaluation(config, model, params, test_source, shard_fn, key,
                         workdir=None):
  """The configured attacks (`config.eval`) on the configured test images;
  AutoAttack's log.txt (and adversarial examples) go to `workdir`."""
  eval_cfg = config.eval
  num_examples = (evaluation.robustbench_num_examples(config)
                  if eval_cfg.protocol == "robustbench"
                  else eval_cfg.num_examples or None)
  options = evaluation.autoattack_options(config)
  return evaluation.evaluate(
      model, params, test_source, eval_cfg.attacks, key=key,
      eps=eval_cfg.eps or config.attack.eps, alpha=eval_cfg.alpha,
      restarts=eval_cfg.restarts, batch_size=eval_cfg.batch_size,
      num_examples=num_examples, shard_fn=shard_fn, output_dir=workdir,
      workers=config.data.workers, **options)


def config_for_evaluation(cli_config, workdir: str):
  """The run's own config with the command's `eval`.

  The run's config is the one its newest checkpoint carries (config.json for
  runs saved before checkpoints carried it). Without either (evaluating a
  converted checkpoint) the command's config is used as it is.
  """
  if cli_config.init.checkpoint:
    return cli_config
  recorded, _ = validate.recorded_config(workdir)
  if recorded is None:
    return cli_config
  run_config = ml_collections.ConfigDict(recorded)
  run_config.eval = ml_collections.ConfigDict(cli_config.eval.to_dict())
  return run_config


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  """`--mode=eval`: evaluates a trained or converted model, trains nothing.

  The params come from `config.init.checkpoint` when set (a timm / npz /
  exported file), else from the latest checkpoint in `workdir`. The result
  is written to `workdir/robustness.json`.
  """
  wall_start = time.perf_counter()
  validate.check_config(config)
  mesh = parallel.make_mesh(config.get("num_devices", 0))
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  if not config.init.checkpoint and not run_checkpoints.has_checkpoints(
      workdir):
    raise UserError(f"no checkpoint in {run_checkpoints.directory(workdir)}:"
                    " train first, or pass --config.init.checkpoint=FILE")
  if not config.init.checkpoint:
    validate.check_workdir_config(config, workdir)
  splits = data_lib.load(config.data)
  model = build_model(config, splits)
  if config.init.checkpoint:
    checkpoints.check(config.init.checkpoint, model, config.init.format,
                      config.init.allow_pickle)
  if config.init.checkpoint:
    init_key, _, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    dummy = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
    params = checkpoints.load(
        config.init.checkpoint, model,
        init_params=jax.jit(model.init)(init_key, dummy)["params"],
        format=config.init.format, allow_pickle=config.init.allow_pickle)
    source = config.init.checkpoint
  else:
    # Shapes only until the restore (nothing compiled if it fails).
    tx, _ = optim.make_optimizer(config.optim, config.epochs, 1)
    abstract_state = _abstract_state(model, tx, config.seed)
    ckpt = run_checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
    state, step, _ = run_checkpoints.restore_latest(
        ckpt, abstract_state, set_aside=False, advice=(
            "evaluate them with the config they were trained with (that "
            "run's --config and --config.* flags), or pass "
            "--config.init.checkpoint=FILE"))
    if state is None:
      raise UserError(f"no checkpoint in {run_checkpoints.directory(workdir)}:"
                      " train first, or pass --config.init.checkpoint=FILE")
    params = state.params
    source = f"{run_checkpoints.directory(workdir)} step {step}"
    _, _, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  params = parallel.replicate(mesh, params)
  result = run_final_evaluation(
      config, model, params, splits.test,
      functools.partial(parallel.shard_batch, mesh), eval_key, workdir)
  result.update(eps=config.eval.eps or config.attack.eps,
                model=config.model.name, checkpoint=source,
                wall_time_s=time.perf_counter() - wall_start)
  result["table"] = format_table(result, config.eval.attacks)
  if jax.process_index() == 0:
    _write_results(workdir, result, metrics=False)
  return result


def _write_results(workdir: str, result, *, metrics: bool) -> None:
  """metrics.json (training) and robustness.json/.md, atomically.

  A workdir that cannot take them (read-only, full) costs a warning, never
  the result: the caller prints the table either way.
  """
  written = {k: v for k, v in result.items() if k != "table"}
  try:
    os.makedirs(workdir, exist_ok=True)
    if metrics:
      workdir_lib.write_json(os.path.join(workdir, "metrics.json"), written,
                             indent=2)
    report.write_robustness_report(workdir, written)  # .json and .md
  except OSError as e:
    result["write_error"] = f"{type(e).__name__}: {e}"
    logging.warning("results not written to %s (%s); the table printed "
                    "below is the result", workdir, e)


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops records of steps after `last_step` (they are about to be redone).

  A line that does not parse (the half-written tail a SIGKILL or a full disk
  leaves) is dropped too. The file is replaced atomically.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  workdir_lib.write_text(path, "".join(kept))


def _start_over(workdir: str) -> None:
  run_checkpoints.delete_all(workdir)
  for name in ("config.json", "metrics.json", "metrics.jsonl",
               *report.RUN_FILES):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
  shutil.rmtree(os.path.join(workdir, metric_writers.TENSORBOARD_DIR),
                ignore_errors=True)


def train_and_evaluate(config, workdir: str, *,
                       overwrite: bool = False) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible); returns metrics.

  Args:
    config: the run's ConfigDict (see configs/default.py).
    workdir: checkpoints, config.json and metrics files go here.
    overwrite: delete the workdir's run (checkpoints and metrics) and start
      over instead of resuming or refusing a different config.

  Raises:
    UserError: a bad config, data or checkpoint, before any compilation.
    FloatingPointError: a non-finite loss or gradient norm.
    preemption.Preempted: SIGTERM/SIGINT; the checkpoint of its step is saved.
  """
  wall_start = time.perf_counter()
  # Everything that can fail on user input is checked before the workdir is
  # touched and before anything is compiled.
  validate.check_config(config)
  workdir_lib.check_writable(workdir)
  if overwrite:
    run_checkpoints.check_is_a_run(workdir)
  mesh = parallel.make_mesh(config.get("num_devices", 0))
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  if not overwrite:
    validate.check_workdir_config(config, workdir)
  # Process 0 holds the lock for all hosts of a multi-host run.
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir_lib.check_unlocked(workdir)
  splits = data_lib.load(config.data)
  model = build_model(config, splits)
  steps_per_epoch = pipeline.steps_per_epoch(len(splits.train),
                                             config.batch_size)
  total_steps = validate.check_steps(config, steps_per_epoch)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                      steps_per_epoch)
  objective = objectives.make_objective(config, model)
  if config.init.checkpoint:
    checkpoints.check(config.init.checkpoint, model, config.init.format,
                      config.init.allow_pickle)
  previous = None if overwrite else run_checkpoints.read_meta(workdir)
  if previous and previous.get("steps_per_epoch",
                               steps_per_epoch) != steps_per_epoch:
    raise UserError(
        f"the training data changed since the run in {workdir!r} was saved "
        f"({previous['steps_per_epoch']} steps per epoch then, "
        f"{steps_per_epoch} now): restore the data, use a new --workdir, or "
        "pass --overwrite to start over")
  # The first write: from here on this process owns the workdir.
  with (workdir_lib.lock(workdir) if is_chief else contextlib.nullcontext()):
    return _train_locked(config, workdir, overwrite, wall_start, mesh, splits,
                         model, steps_per_epoch, total_steps, tx, schedule,
                         objective)


def _train_locked(config, workdir, overwrite, wall_start, mesh, splits, model,
                  steps_per_epoch, total_steps, tx, schedule, objective):
  """`train_and_evaluate` once every check passed and the lock is held."""
  if overwrite:
    _start_over(workdir)
  else:  # a run that took the lock between the checks and here
    validate.check_workdir_config(config, workdir)

  # Shapes only until the restore: a run whose checkpoints are all
  # unreadable is refused before anything is compiled.
  abstract_state = _abstract_state(model, tx, config.seed)
  shardings = parallel.state_shardings(
      mesh, abstract_state, fsdp=config.fsdp,
      fsdp_min_size=config.fsdp_min_size)
  ckpt = run_checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  state, start_step, meta = run_checkpoints.restore_latest(
      ckpt, parallel.with_shardings(abstract_state, shardings))
  init_key, loop_key, eval_key = jax.random.split(
      jax.random.key(config.seed), 3)
  dummy = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  if state is None:
    params = jax.jit(model.init)(init_key, dummy)["params"]
    if config.init.checkpoint:
      params = checkpoints.load(
          config.init.checkpoint, model, init_params=params,
          format=config.init.format, allow_pickle=config.init.allow_pickle)
      logging.info("initialised from %s", config.init.checkpoint)
    state = TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params))
    start_step = 0
  elif meta.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
    raise UserError(
        f"the training data changed since the checkpoint of step {start_step}"
        f" ({meta['steps_per_epoch']} steps per epoch then, {steps_per_epoch}"
        " now): restore the data or pass --overwrite to start over")
  # Only now, with every check passed and the run restored.
  validate.write_workdir_config(config, workdir)
  run_config = validate.config_as_dict(config)
  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  logging.info("model %s: %.2fM parameters, %d steps/epoch, %d steps%s",
               config.model.name, num_params / 1e6, steps_per_epoch,
               total_steps, f", resuming at step {start_step}" if start_step
               else "")
  state = jax.device_put(state, shardings)
  if config.fsdp:
    leaves = jax.tree.leaves(state)
    logging.info("FSDP: %d of %d state arrays split over %d devices",
                 sum(not x.sharding.is_fully_replicated for x in leaves),
                 len(leaves), mesh.devices.size)

  train_step = jax.jit(
      make_train_step(config, model, objective, tx, schedule,
                      steps_per_epoch, splits.num_classes),
      out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=0)
  shard = functools.partial(parallel.shard_batch, mesh)
  # Every host reads only its rows of each evaluation batch, as in training.
  shard_eval = functools.partial(parallel.shard_batch, mesh)
  eval_cfg = config.eval
  eval_eps = eval_cfg.eps or config.attack.eps
  epoch_eval = evaluation.make_evaluator(
      model, eval_cfg.epoch_attacks, eps=eval_eps,
      alpha=eval_cfg.alpha, shard_fn=shard_eval)
  log_path = os.path.join(workdir, "metrics.jsonl")
  _truncate_jsonl(log_path, start_step)
  is_chief = jax.process_index() == 0
  writer = metric_writers.MetricWriter(
      workdir, enabled=is_chief,
      purge_step=start_step + 1 if start_step else None)
  if start_step == 0:
    writer.write_text(0, {"config": "```\n" + config.to_json_best_effort(
        indent=2) + "\n```"})
  bar = progress_lib.Progress(total_steps, steps_per_epoch, config.batch_size,
                              start_step=start_step,
                              enabled=None if is_chief else False)

  def save(step, state, history):
    # Never checkpoint a state whose recent metrics are not finite.
    if history:
      _check_finite(_mean_metrics(history), step, config)
    run_checkpoints.save(ckpt, step, state, meta={
        "seed": config.seed, "steps_per_epoch": steps_per_epoch,
        "epoch": step // steps_per_epoch,
        "index_in_epoch": step % steps_per_epoch, "config": run_config})

  batches = pipeline.train_batches(
      splits.train, config.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), workers=config.data.workers)
  history = []
  train_seconds = 0.0
  epoch_start = time.perf_counter()
  # closing(): an exception in the loop still stops the loader's workers.
  with preemption.PreemptionGuard() as guard, contextlib.closing(batches):
    try:
      for step in range(start_step, total_steps):
        images, labels = next(batches)
        images, labels = shard((images, labels.astype(np.int32)))
        state, metrics = train_step(state, images, labels, loop_key)
        history.append(metrics)
        done = step + 1
        bar.update(done)
        if done % config.log_every_steps == 0 or done == total_steps:
          summary = _mean_metrics(history)
          history = []
          _check_finite(summary, done, config)
          writer.write_scalars(done, {"epoch": done / steps_per_epoch, **{
              f"train_{k}": v for k, v in summary.items()}})
          bar.set_metrics({"loss": summary["loss"],
                           "adv-acc": summary["accuracy"]})
          with bar.hidden():
            logging.info("step %d/%d  loss %.4f  adv-acc %.3f  lr %.4g  "
                         "grad-norm %.3f  r %.3f", done, total_steps,
                         summary["loss"], summary["accuracy"], summary["lr"],
                         summary["grad_norm"], summary["r"])
        if done % steps_per_epoch == 0 and eval_cfg.epoch_num_examples:
          jax.block_until_ready(state)
          train_seconds += time.perf_counter() - epoch_start
          result = epoch_eval(
              state.params,
              pipeline.eval_batches(splits.test, eval_cfg.batch_size,
                                    eval_cfg.epoch_num_examples,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    workers=config.data.workers),
              jax.random.fold_in(eval_key, done))
          epoch = done // steps_per_epoch
          writer.write_scalars(done, {"epoch": epoch, **{
              f"test_{k}": v for k, v in result.items()}})
          writer.flush()
          logging.info("epoch %d: %s", epoch, "  ".join(
              f"{n} {result[n + '_acc']:.3f}" for n in eval_cfg.epoch_attacks))
          epoch_start = time.perf_counter()
        if done == total_steps or done % config.checkpoint_every_steps == 0:
          save(done, state, history)
        elif guard.requested:
          save(done, state, history)
        if guard.requested:
          bar.close()
          writer.close()
          ckpt.wait_until_finished()
          batches.close()
          raise preemption.Preempted(done, guard.signum)
      jax.block_until_ready(state)
      train_seconds += time.perf_counter() - epoch_start
      bar.close()
      batches.close()
      ckpt.wait_until_finished()
      # From here a signal stops the run at once: the last checkpoint is
      # saved, and the rerun of the same command evaluates it again.
      guard.stop_at_once(total_steps, "during the final evaluation")

      eval_start = time.perf_counter()
      result = run_final_evaluation(config, model, state.params,
                                    splits.test, shard_eval, eval_key,
                                    workdir)
      result.update(
          eps=eval_eps, model=config.model.name, method=config.method,
          ard=config.ard, prm=config.prm, steps=total_steps,
          resumed_from_step=start_step, train_time_s=train_seconds,
          eval_time_s=time.perf_counter() - eval_start,
          wall_time_s=time.perf_counter() - wall_start)
      writer.write_scalars(total_steps, {  # the final evaluation, in TB
          f"final_{k}": v for k, v in result.items()
          if k.endswith("_acc") or k == "num_eval_images"})
      writer.close()
      result["table"] = format_table(result, eval_cfg.attacks)
      if is_chief:
        _write_results(workdir, result, metrics=True)
      guard.stop_at_once(None)
    except BaseException:
      # A NaN stop, an error or a signal: the checkpoint being written in
      # the background is finished first, never left half-done.
      ckpt.wait_until_finished()
      raise
  if is_chief:
    try:
      report.plot_run(workdir)
    except Exception as e:  # pylint: disable=broad-except
      # A figure must never cost a finished run its metrics.
      logging.warning("plots not written to %s: %s", workdir, e)
  return result

"""The training loop: the jitted step, evaluations and checkpoints, resumable.

`train_and_evaluate(config, workdir)`: (1) every check before anything is
compiled or written (`setup.prepare`); (2) the newest readable checkpoint,
else a new state; (3) the loop (a batch is a function of (seed, step), so a
resume continues bit for bit; `checkpointing.should_save`); (4) the final
evaluation, metrics.json, the robustness report and the plots.
"""

import collections
import contextlib
import dataclasses
import time
from typing import Any, Dict, List

import jax
import numpy as np
from absl import logging

from vitat_jax import checkpointing
from vitat_jax import compilation
from vitat_jax import evaluation
from vitat_jax import memory
from vitat_jax import metric_writers
from vitat_jax import model_names
from vitat_jax import objectives
from vitat_jax import parallel
from vitat_jax import plots
from vitat_jax import preemption
from vitat_jax import progress as progress_lib
from vitat_jax import report
from vitat_jax import results
from vitat_jax import setup as setup_lib
from vitat_jax import state as state_lib
from vitat_jax import train_step as train_step_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import pipeline

# Steps dispatched ahead of the last finished one. Enough to keep an
# accelerator busy while the host prepares the next batch; far below XLA:CPU's
# 32 in-flight computations per device, whose blocked dispatches can starve
# a multi-device all-reduce of threads (docs/parallel.md).
MAX_STEPS_IN_FLIGHT = 4


def train_and_evaluate(config,
                       workdir: str,
                       *,
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
  run = setup_lib.prepare(config, workdir, "train", overwrite=overwrite)
  is_chief = jax.process_index() == 0
  # The first write: from here on this process owns the workdir.
  with (workdir_lib.lock(workdir) if is_chief else contextlib.nullcontext()):
    if overwrite:
      if is_chief:  # one deleter for a shared workdir; the others wait
        workdir_lib.start_over(workdir)
      parallel.barrier("start over")
    else:  # a run that took the lock between the checks and here
      workdir_lib.check_same_config(config, workdir)
    result = _train_and_evaluate(run, wall_start)
  if is_chief:
    try:
      plots.plot_run(workdir)
    except Exception as e:  # pylint: disable=broad-except
      # A figure must never cost a finished run its metrics.
      logging.warning("plots not written to %s: %s", workdir, e)
  return result


@dataclasses.dataclass(frozen=True)
class _Services:
  """What the loop writes to and evaluates with (built once per run)."""
  run: setup_lib.Setup
  ckpt: Any  # orbax CheckpointManager
  writer: metric_writers.MetricWriter
  evaluator: evaluation.Evaluator
  loop_key: Any
  eval_key: Any


def _train_and_evaluate(run: setup_lib.Setup, wall_start: float):
  config, is_chief = run.config, jax.process_index() == 0
  # A registered objective's own checks fail here, before the run's files.
  objective = objectives.make_objective(config, run.model)
  ckpt, state, start_step, shardings, meta = checkpointing.restore_or_init(run)
  _, loop_key, eval_key = state_lib.run_keys(config.seed)
  logging.info("%d steps/epoch, %d steps%s", run.steps_per_epoch,
               run.total_steps,
               f", resuming at step {start_step}" if start_step else "")
  # Only now, with every check passed and the run restored.
  if is_chief:
    workdir_lib.write_config(config, run.workdir)
  train_step = jax.jit(train_step_lib.make_train_step(config, run.model,
                                                      objective, run.tx,
                                                      run.schedule,
                                                      run.steps_per_epoch,
                                                      run.splits.num_classes),
                       out_shardings=(shardings, parallel.replicated(run.mesh)),
                       donate_argnums=0)
  writer = metric_writers.MetricWriter(run.workdir,
                                       enabled=is_chief,
                                       purge_step=start_step + 1)
  if start_step == 0:
    writer.write_text(
        0, {"config": "```\n" + config.to_json_best_effort(indent=2) + "\n```"})
  # Every host reads only its rows of each evaluation batch, as in training.
  services = _Services(
      run, ckpt, writer,
      evaluation.Evaluator.from_config(config, run.model, run.shard), loop_key,
      eval_key)
  # The metrics of the steps since the last log step: the first log record
  # after a resume then averages the same steps as without one.
  pending = [{
      k: np.float32(v) for k, v in m.items()
  } for m in meta.get("pending_metrics", [])]
  with preemption.PreemptionGuard() as guard:
    try:
      state, train_seconds = _loop(services, train_step, state, start_step,
                                   pending, guard)
      # From here a signal stops the run at once: the last checkpoint is
      # saved, and the rerun of the same command evaluates it again. (With
      # several hosts, a host stopping alone would leave the others in a
      # collective: there the evaluation finishes.)
      single = jax.process_count() == 1
      if single:
        guard.stop_at_once(run.total_steps, "during the final evaluation")
      result = _final_evaluation(services, state, start_step, train_seconds,
                                 wall_start)
      if single:
        guard.stop_at_once(None)
    except BaseException:
      # A NaN stop, an error or a signal: the checkpoint being written in
      # the background is finished first, never left half-done.
      ckpt.wait_until_finished()
      writer.close()
      raise
  return result


def _loop(services: _Services, train_step, state, start_step: int,
          history: List[Any], guard):
  """Steps `start_step` to the end; (state, training seconds)."""
  run = services.run
  config, spe, total = run.config, run.steps_per_epoch, run.total_steps
  bar = progress_lib.Progress(
      total,
      spe,
      config.batch_size,
      start_step=start_step,
      enabled=None if jax.process_index() == 0 else False)
  batches = pipeline.train_batches(run.splits.train,
                                   config.batch_size,
                                   seed=config.seed,
                                   start_step=start_step,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   workers=config.data.workers,
                                   extra=run.extra)
  in_flight = collections.deque()
  last_save = time.monotonic()
  train_seconds, epoch_start = 0.0, time.perf_counter()
  # closing(): an exception in the loop still stops the loader's workers.
  with contextlib.closing(batches), contextlib.closing(bar):
    for step in range(start_step, total):
      images, labels = next(batches)
      images, labels = run.shard((images, labels.astype(np.int32)))
      if step == start_step:  # compiled ahead, refused if it cannot fit
        hits, start = compilation.cache_hits(), time.perf_counter()
        train_step = memory.compile_and_check(
            train_step, (state, images, labels, services.loop_key), config)
      state, metrics = train_step(state, images, labels, services.loop_key)
      if step == start_step:
        jax.block_until_ready(metrics)
        logging.info("first step in %.1f s: %s",
                     time.perf_counter() - start,
                     compilation.describe(hits, run.cache_dir))
      history.append(metrics)
      in_flight.append(metrics)
      if len(in_flight) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      done = step + 1
      bar.update(done)
      logged = done % config.log_every_steps == 0 or done == total
      if logged:
        _log_train(services, done, train_step_lib.mean_metrics(history), bar)
        history = []
      if done % spe == 0 and config.eval.epoch_num_examples:
        jax.block_until_ready(state)
        train_seconds += time.perf_counter() - epoch_start
        _epoch_evaluation(services, done,
                          state_lib.evaluated_params(config, state))
        epoch_start = time.perf_counter()
      # A signal to any host stops every host after the same step: several
      # hosts agree at log steps only (no collective per step).
      signum = (parallel.first_signal(guard.signum)
                if logged or jax.process_count() == 1 else None)
      if checkpointing.should_save(
          done,
          total=total,
          steps_per_epoch=spe,
          config=config,
          stopping=bool(signum),
          clock_due=logged and checkpointing.minutes_passed(config, last_save)):
        last_save = time.monotonic()
        checkpointing.save_run(services.ckpt,
                               done,
                               state,
                               config,
                               spe,
                               history,
                               services.writer.flush,
                               model=run.model)
      if signum:
        services.writer.close()
        services.ckpt.wait_until_finished()
        raise preemption.Preempted(done, signum)
    jax.block_until_ready(state)
  train_seconds += time.perf_counter() - epoch_start
  services.ckpt.wait_until_finished()
  return state, train_seconds


def _log_train(services: _Services, done: int, summary, bar) -> None:
  config, run = services.run.config, services.run
  train_step_lib.check_finite(summary, done, config)
  scalars = {f"train_{k}": v for k, v in summary.items()}
  services.writer.write_scalars(done, {
      "epoch": done / run.steps_per_epoch,
      **scalars
  })
  bar.set_metrics({"loss": summary["loss"], "adv-acc": summary["accuracy"]})
  with bar.hidden():
    logging.info(
        "step %d/%d  loss %.4f  adv-acc %.3f  lr %.4g  "
        "grad-norm %.3f  r %.3f", done, run.total_steps, summary["loss"],
        summary["accuracy"], summary["lr"], summary["grad_norm"], summary["r"])


def _epoch_evaluation(services: _Services, done: int, params) -> None:
  run, evaluator = services.run, services.evaluator
  result = evaluator.epoch(params, run.splits.test,
                           jax.random.fold_in(services.eval_key, done))
  epoch = done // run.steps_per_epoch
  scalars = {
      f"test_{k}": v for k, v in result.items() if not isinstance(v, dict)
  }
  services.writer.write_scalars(done, {"epoch": epoch, **scalars})
  services.writer.flush()
  logging.info(
      "epoch %d: %s", epoch, "  ".join(
          f"{n} {result[n + '_acc']:.3f}" for n in evaluator.epoch_attacks))


def _final_evaluation(services: _Services, state, start_step: int,
                      train_seconds: float,
                      wall_start: float) -> Dict[str, Any]:
  run = services.run
  config, total = run.config, run.total_steps
  eval_start = time.perf_counter()
  result = services.evaluator.final(state_lib.evaluated_params(config, state),
                                    run.splits.test, services.eval_key,
                                    run.workdir)
  result.update(eps=services.evaluator.eps,
                model=model_names.label(config),
                method=config.method,
                ard=config.tricks.ard,
                prm=config.tricks.prm,
                steps=total,
                weights=state_lib.evaluated_weights(config),
                resumed_from_step=start_step,
                train_time_s=train_seconds,
                eval_time_s=time.perf_counter() - eval_start,
                wall_time_s=time.perf_counter() - wall_start)
  # The final evaluation, in TensorBoard too.
  scalars = {
      f"final_{k}": v
      for k, v in result.items()
      if k.endswith("_acc") or k == "num_eval_images"
  }
  services.writer.write_scalars(total, scalars)
  services.writer.close()
  result["table"] = report.format_table(result, config.eval.attacks)
  if jax.process_index() == 0:
    results.write_results(run.workdir, result, training=True)
  return result

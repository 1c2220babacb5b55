"""The training loop: the jitted step, evaluations and checkpoints, resumable.

`train_and_evaluate(config, workdir)`, what `main.py` calls: (1) every check
of the config, workdir, devices and data, before anything is compiled or
written; (2) the newest readable checkpoint, else a new state (`state.py`);
(3) the loop, where a batch is a function of (seed, step), so a resumed run
continues bit for bit, with metrics, epoch evaluations and checkpoints by
steps and by minutes; (4) the final evaluation, metrics.json, the robustness
report and the plots.
"""

import collections
import contextlib
import functools
import time
from typing import Any, Dict

import jax
import numpy as np
from absl import logging

from vitat_jax import checkpoints
from vitat_jax import compilation
from vitat_jax import data as data_lib
from vitat_jax import evaluation
from vitat_jax import metric_writers
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import plots
from vitat_jax import preemption
from vitat_jax import progress as progress_lib
from vitat_jax import report
from vitat_jax import state as state_lib
from vitat_jax import train_step as train_step_lib
from vitat_jax import validate
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
  # ---------------------------------------------------------------- checks
  # Everything that can fail on user input, before the workdir is touched
  # and before anything is compiled.
  validate.check_config(config)
  workdir_lib.check_writable(workdir)
  cache_dir = compilation.enable_cache(config.compilation_cache_dir)
  if overwrite:
    workdir_lib.check_is_a_run(workdir)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  if not overwrite:
    workdir_lib.check_same_config(config, workdir)
  # Process 0 holds the lock for all hosts of a multi-host run.
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir_lib.check_unlocked(workdir)
  splits = data_lib.load(evaluation.protocol_data_config(config))
  model = state_lib.build_model(config, splits)
  tx, schedule, steps_per_epoch = state_lib.make_optimizer(config, splits)
  optim.log_lr_warning(config.optim, config.epochs)
  total_steps = validate.check_steps(config, steps_per_epoch)
  objective = objectives.make_objective(config, model)
  if config.init.checkpoint:
    checkpoints.check(config.init.checkpoint, model, config.init.format,
                      config.init.allow_pickle)
  if not overwrite:
    state_lib.check_same_data(workdir_lib.read_meta(workdir), steps_per_epoch,
                              f"the run in {workdir!r}")
  run = _Run(config, workdir, mesh, splits, model, objective, tx, schedule,
             steps_per_epoch, total_steps, cache_dir)
  # The first write: from here on this process owns the workdir.
  with (workdir_lib.lock(workdir) if is_chief else contextlib.nullcontext()):
    if overwrite:
      if is_chief:  # one deleter for a shared workdir; the others wait
        workdir_lib.start_over(workdir)
      parallel.barrier("start over")
    else:  # a run that took the lock between the checks and here
      workdir_lib.check_same_config(config, workdir)
    result = run.train_and_evaluate(wall_start)
  if is_chief:
    try:
      plots.plot_run(workdir)
    except Exception as e:  # pylint: disable=broad-except
      # A figure must never cost a finished run its metrics.
      logging.warning("plots not written to %s: %s", workdir, e)
  return result


class _Run:
  """One training run once every check passed: its state, loop and end."""

  def __init__(self, config, workdir, mesh, splits, model, objective, tx,
               schedule, steps_per_epoch, total_steps, cache_dir):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.splits, self.model, self.objective = splits, model, objective
    self.tx = tx
    self.schedule = schedule
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.cache_dir = cache_dir
    self.is_chief = jax.process_index() == 0
    self.last_save = time.monotonic()
    self.shard = functools.partial(parallel.shard_batch, mesh)
    # Every host reads only its rows of each evaluation batch, as in training.
    self.evaluator = evaluation.Evaluator.from_config(config, model, self.shard)

  # ----------------------------------------------------------------- state
  def checkpoint_due(self) -> bool:
    """Whether `checkpoint_every_minutes` have passed since the last save,
    by process 0's clock (checked at log steps: one decision, all hosts)."""
    minutes = self.config.checkpoint_every_minutes
    if not minutes:
      return False
    return parallel.agree(time.monotonic() - self.last_save >= 60 * minutes)

  def epoch_checkpoint_due(self, done) -> bool:
    """Whether `done` ends an epoch that `checkpoint_every_epochs` saves."""
    every = self.config.checkpoint_every_epochs
    return bool(every) and done % self.steps_per_epoch == 0 and (
        done // self.steps_per_epoch) % every == 0

  def save(self, step, state, history):
    """An asynchronous checkpoint of `step`, never of non-finite metrics."""
    self.last_save = time.monotonic()
    # TensorBoard's events as far as the checkpoint (a cloud workdir's are
    # uploaded at flushes), so a resumed run's curves have no gap.
    self.writer.flush()
    pending = []
    if history:
      train_step_lib.check_finite(train_step_lib.mean_metrics(history), step,
                                  self.config)
      pending = [{
          k: float(v) for k, v in m.items()
      } for m in jax.device_get(history)]
    spe = self.steps_per_epoch
    state_lib.save_checkpoint(
        self.ckpt,
        step,
        state,
        meta={
            "seed": self.config.seed,
            "steps_per_epoch": spe,
            "epoch": step // spe,
            "index_in_epoch": step % spe,
            "config": workdir_lib.config_as_dict(self.config),
            "pending_metrics": pending
        })

  # ------------------------------------------------------------------- run
  def train_and_evaluate(self, wall_start):
    config = self.config
    self.ckpt, state, start_step, shardings, meta = state_lib.restore_or_init(
        config, self.workdir, self.model, self.tx, self.mesh,
        self.steps_per_epoch)
    # The metrics of the steps since the last log step: the first log
    # record after a resume then averages the same steps as without one.
    self.pending = [{
        k: np.float32(v) for k, v in m.items()
    } for m in meta.get("pending_metrics", [])]
    _, self.loop_key, self.eval_key = state_lib.run_keys(config.seed)
    logging.info("%d steps/epoch, %d steps%s", self.steps_per_epoch,
                 self.total_steps,
                 f", resuming at step {start_step}" if start_step else "")
    # Only now, with every check passed and the run restored.
    if self.is_chief:
      workdir_lib.write_config(config, self.workdir)
    train_step = jax.jit(train_step_lib.make_train_step(
        config, self.model, self.objective, self.tx, self.schedule,
        self.steps_per_epoch, self.splits.num_classes),
                         out_shardings=(shardings,
                                        parallel.replicated(self.mesh)),
                         donate_argnums=0)
    self.writer = metric_writers.MetricWriter(self.workdir,
                                              enabled=self.is_chief,
                                              purge_step=start_step + 1)
    if start_step == 0:
      self.writer.write_text(
          0,
          {"config": "```\n" + config.to_json_best_effort(indent=2) + "\n```"})
    with preemption.PreemptionGuard() as guard:
      try:
        state, train_seconds = self.loop(train_step, state, start_step, guard)
        # From here a signal stops the run at once: the last checkpoint is
        # saved, and the rerun of the same command evaluates it again. (With
        # several hosts, a host stopping alone would leave the others in a
        # collective: there the evaluation finishes.)
        single = jax.process_count() == 1
        if single:
          guard.stop_at_once(self.total_steps, "during the final evaluation")
        result = self.final_evaluation(state, start_step, train_seconds,
                                       wall_start)
        if single:
          guard.stop_at_once(None)
      except BaseException:
        # A NaN stop, an error or a signal: the checkpoint being written in
        # the background is finished first, never left half-done.
        self.ckpt.wait_until_finished()
        self.writer.close()
        raise
    return result

  def loop(self, train_step, state, start_step, guard):
    """Steps `start_step` to the end; (state, training seconds)."""
    config, spe, total = self.config, self.steps_per_epoch, self.total_steps
    bar = progress_lib.Progress(total,
                                spe,
                                config.batch_size,
                                start_step=start_step,
                                enabled=None if self.is_chief else False)
    batches = pipeline.train_batches(self.splits.train,
                                     config.batch_size,
                                     seed=config.seed,
                                     start_step=start_step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     workers=config.data.workers)
    history, self.pending = self.pending, []
    in_flight = collections.deque()
    train_seconds, epoch_start = 0.0, time.perf_counter()
    # closing(): an exception in the loop still stops the loader's workers.
    with contextlib.closing(batches), contextlib.closing(bar):
      for step in range(start_step, total):
        images, labels = next(batches)
        images, labels = self.shard((images, labels.astype(np.int32)))
        if step == start_step:
          hits, start = compilation.cache_hits(), time.perf_counter()
        state, metrics = train_step(state, images, labels, self.loop_key)
        if step == start_step:
          jax.block_until_ready(metrics)
          logging.info("first step in %.1f s: %s",
                       time.perf_counter() - start,
                       compilation.describe(hits, self.cache_dir))
        history.append(metrics)
        in_flight.append(metrics)
        if len(in_flight) > MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(in_flight.popleft())
        done = step + 1
        bar.update(done)
        logged = done % config.log_every_steps == 0 or done == total
        if logged:
          self.log_train(done, train_step_lib.mean_metrics(history), bar)
          history = []
        if done % spe == 0 and config.eval.epoch_num_examples:
          jax.block_until_ready(state)
          train_seconds += time.perf_counter() - epoch_start
          self.epoch_evaluation(done, state.params)
          epoch_start = time.perf_counter()
        # A signal to any host stops every host after this same step.
        signum = parallel.first_signal(guard.signum)
        if (done == total or done % config.checkpoint_every_steps == 0 or
            signum or self.epoch_checkpoint_due(done) or
            (logged and self.checkpoint_due())):
          self.save(done, state, history)
        if signum:
          self.writer.close()
          self.ckpt.wait_until_finished()
          raise preemption.Preempted(done, signum)
      jax.block_until_ready(state)
    train_seconds += time.perf_counter() - epoch_start
    self.ckpt.wait_until_finished()
    return state, train_seconds

  def log_train(self, done, summary, bar):
    train_step_lib.check_finite(summary, done, self.config)
    scalars = {f"train_{k}": v for k, v in summary.items()}
    self.writer.write_scalars(done, {
        "epoch": done / self.steps_per_epoch,
        **scalars
    })
    bar.set_metrics({"loss": summary["loss"], "adv-acc": summary["accuracy"]})
    with bar.hidden():
      logging.info(
          "step %d/%d  loss %.4f  adv-acc %.3f  lr %.4g  "
          "grad-norm %.3f  r %.3f", done, self.total_steps, summary["loss"],
          summary["accuracy"], summary["lr"], summary["grad_norm"],
          summary["r"])

  def epoch_evaluation(self, done, params):
    result = self.evaluator.epoch(params, self.splits.test,
                                  jax.random.fold_in(self.eval_key, done))
    epoch = done // self.steps_per_epoch
    scalars = {
        f"test_{k}": v for k, v in result.items() if not isinstance(v, dict)
    }
    self.writer.write_scalars(done, {"epoch": epoch, **scalars})
    self.writer.flush()
    logging.info(
        "epoch %d: %s", epoch, "  ".join(f"{n} {result[n + '_acc']:.3f}"
                                         for n in self.evaluator.epoch_attacks))

  def final_evaluation(self, state, start_step, train_seconds, wall_start):
    config, total = self.config, self.total_steps
    eval_start = time.perf_counter()
    result = self.evaluator.final(state.params, self.splits.test, self.eval_key,
                                  self.workdir)
    result.update(eps=self.evaluator.eps,
                  model=config.model.name,
                  method=config.method,
                  ard=config.tricks.ard,
                  prm=config.tricks.prm,
                  steps=total,
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
    self.writer.write_scalars(total, scalars)
    self.writer.close()
    result["table"] = report.format_table(result, config.eval.attacks)
    if self.is_chief:
      report.write_results(self.workdir, result, training=True)
    return result

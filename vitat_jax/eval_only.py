"""`--mode=eval`: evaluates a trained or converted model, trains nothing.

    result = eval_only.evaluate_checkpoint(
        eval_only.config_for_evaluation(cli_config, workdir), workdir)

The params come from `config.init.checkpoint` when set (a timm / npz /
exported file), else from the latest checkpoint in `workdir`, restored with
the run's own config. The result goes to `workdir/robustness.{json,md}`.
"""

import functools
import time
from typing import Any, Dict

import jax
import ml_collections

from vitat_jax import checkpoints
from vitat_jax import compilation
from vitat_jax import data as data_lib
from vitat_jax import evaluation
from vitat_jax import parallel
from vitat_jax import report
from vitat_jax import state as state_lib
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError


def config_for_evaluation(cli_config, workdir: str):
  """The run's own config with the command's `eval`.

  The run's config is the one its newest checkpoint carries (config.json for
  runs saved before checkpoints carried it), completed with the fields added
  since. Without either (evaluating a converted checkpoint) the command's
  config is used as it is.
  """
  if cli_config.init.checkpoint:
    return cli_config
  recorded, _ = workdir_lib.recorded_config(workdir)
  if recorded is None:
    return cli_config
  return ml_collections.ConfigDict(
      workdir_lib.merge_run_config(cli_config.to_dict(),
                                   recorded,
                                   keep=("eval",)))


def no_checkpoint(workdir: str) -> UserError:
  return UserError(f"no checkpoint in {workdir_lib.checkpoints_dir(workdir)}:"
                   " train first, or pass --config.init.checkpoint=FILE")


def restore_params(config, workdir: str, model, splits):
  """(params, where they came from) of the newest readable checkpoint."""
  tx, _, _ = state_lib.make_optimizer(config, splits)
  ckpt = state_lib.checkpoint_manager(workdir,
                                      max_to_keep=config.keep_checkpoints)
  state, step, _ = state_lib.restore_latest(
      ckpt,
      state_lib.abstract_state(model, tx, config.seed),
      set_aside=False,
      advice=("evaluate them with the config they were trained with (that "
              "run's --config and --config.* flags), or pass "
              "--config.init.checkpoint=FILE"))
  if state is None:
    raise no_checkpoint(workdir)
  return state.params, f"{workdir_lib.checkpoints_dir(workdir)} step {step}"


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  """Evaluates `config.eval` on the checkpoint; returns the result with its
  printed `table` (and `write_error` if the workdir could not take it)."""
  wall_start = time.perf_counter()
  validate.check_config(config)
  compilation.enable_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  if not config.init.checkpoint:
    if not workdir_lib.has_checkpoints(workdir):
      raise no_checkpoint(workdir)
    workdir_lib.check_same_config(config, workdir)
  splits = data_lib.load(evaluation.protocol_data_config(config))
  model = state_lib.build_model(config, splits)
  if config.init.checkpoint:
    checkpoints.check(config.init.checkpoint, model, config.init.format,
                      config.init.allow_pickle)
    params = state_lib.initial_params(config, model,
                                      state_lib.run_keys(config.seed)[0])
    source = config.init.checkpoint
  else:  # shapes only until the restore: nothing compiled if it fails
    params, source = restore_params(config, workdir, model, splits)
  eval_key = state_lib.run_keys(config.seed)[2]
  evaluator = evaluation.Evaluator.from_config(
      config, model, functools.partial(parallel.shard_batch, mesh))
  result = evaluator.final(parallel.replicate(mesh, params), splits.test,
                           eval_key, workdir)
  result.update(eps=evaluator.eps,
                model=config.model.name,
                checkpoint=source,
                wall_time_s=time.perf_counter() - wall_start)
  result["table"] = report.format_table(result, config.eval.attacks)
  if jax.process_index() == 0:
    report.write_results(workdir, result, training=False)
  return result

"""`--mode=eval`: evaluates a trained or converted model, trains nothing.

    result = eval_only.evaluate_checkpoint(cli_config, workdir)

The params come from `config.init.checkpoint` when set (a timm / npz /
exported file, evaluated as timm defines it unless `init.resample`: see
`setup`), else from the latest checkpoint in `workdir`, restored with the
run's own config (`setup.prepare(..., "eval")`). Only the test split is
read. The result goes to `workdir/robustness.{json,md}`.
"""

import time
from typing import Any, Dict

import jax

from vitat_jax import checkpointing
from vitat_jax import evaluation
from vitat_jax import model_names
from vitat_jax import parallel
from vitat_jax import report
from vitat_jax import results
from vitat_jax import setup as setup_lib
from vitat_jax import state as state_lib


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  """Evaluates `config.eval` on the checkpoint; returns the result with its
  printed `table` (and `write_error` if the workdir could not take it)."""
  wall_start = time.perf_counter()
  run = setup_lib.prepare(config, workdir, "eval")
  config = run.config
  if run.native is not None:  # timm's network, as the checkpoint holds it
    params = state_lib.checkpoint_params(config, run.model)
    source = config.init.checkpoint
  elif config.init.checkpoint:  # init.resample: a new head where needed
    params = state_lib.initial_params(config,
                                      run.model,
                                      state_lib.run_keys(config.seed)[0],
                                      warn_resampling=True)
    source = config.init.checkpoint
  else:  # shapes only until the restore: nothing compiled if it fails
    params, source = checkpointing.restore_params(run)
  eval_key = state_lib.run_keys(config.seed)[2]
  evaluator = evaluation.Evaluator.from_config(config, run.model, run.shard)
  result = evaluator.final(parallel.replicate(run.mesh, params),
                           run.splits.test, eval_key, workdir)
  result.update(eps=evaluator.eps,
                model=model_names.label(config),
                checkpoint=source,
                weights=("init.checkpoint" if config.init.checkpoint else
                         state_lib.evaluated_weights(config)),
                wall_time_s=time.perf_counter() - wall_start)
  result["table"] = report.format_table(result, config.eval.attacks)
  if jax.process_index() == 0:
    results.write_results(workdir, result, training=False)
  return result

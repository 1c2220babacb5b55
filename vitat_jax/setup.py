"""The one prologue of a run: what train, eval and export need, checked.

    run = setup.prepare(config, workdir, "train")   # or "eval", "export"
    run.mesh, run.splits, run.model, run.tx, run.schedule, run.total_steps

`prepare` does, in this order and before anything is compiled or written:
the config's checks (`validate.check_config`), the compilation cache, the
mesh and the batch sizes it must divide, the workdir's checks for the
purpose, the data (as `eval.protocol` reads it), the model, the optimizer
(for training, its parameter groups logged) and the step counts, and the
pre-trained file. Evaluation and export take the
run's own recorded config (`config_for_evaluation`) with the command's
`eval` section. Their walk is training's with the training-only checks
left out, so a new setup step is written once, here.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections

from vitat_jax import checkpointing
from vitat_jax import compilation
from vitat_jax import data as data_lib
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import param_groups
from vitat_jax import parallel
from vitat_jax import pretrained
from vitat_jax import state as state_lib
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.data import pipeline
from vitat_jax.data import protocol
from vitat_jax.errors import UserError
from vitat_jax.models import precision

PURPOSES = ("train", "eval", "export")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run is made of once every check has passed.

  Attributes:
    config: the checked config (for eval and export: the run's own, with the
      command's `eval` section).
    workdir: the run's directory.
    purpose: "train", "eval" or "export".
    mesh: the devices, axis "data".
    splits: the data (`data.DataSplits`), train and test sources.
    model: the Flax module, sized and normalised for the data.
    tx, schedule: the optax chain and its learning-rate schedule.
    steps_per_epoch, total_steps: the training length in steps.
    cache_dir: the compilation cache in use, or None.
    extra: `data.extra`'s rows of each training batch (`data.Extra`), or
      None (and always None unless training).
  """
  config: ml_collections.ConfigDict
  workdir: str
  purpose: str
  mesh: jax.sharding.Mesh
  splits: Any
  model: Any
  tx: Any
  schedule: Callable
  steps_per_epoch: int
  total_steps: int
  cache_dir: Optional[str]
  extra: Optional[pipeline.Extra] = None

  def shard(self, local_arrays):
    """A batch of this process's rows placed on the mesh, axis "data"."""
    return parallel.shard_batch(self.mesh, local_arrays)


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


def _check_workdir(config, workdir: str, purpose: str, overwrite: bool):
  """The workdir's checks for `purpose` (nothing is written)."""
  if config.eval.save_adversarial and purpose != "export":
    workdir_lib.check_output(workdir,
                             workdir_lib.ADVERSARIAL_DIR,
                             folder=True,
                             why="eval.save_adversarial",
                             writable=True)
  if purpose == "train":
    workdir_lib.check_run_outputs(workdir)
    if not overwrite:
      workdir_lib.check_same_config(config, workdir)
    if jax.process_index() == 0:  # process 0 holds the lock for all hosts
      workdir_lib.check_unlocked(workdir)
    return
  if purpose == "export" and config.init.checkpoint:
    raise UserError("--mode=export exports a run's own checkpoint: drop "
                    "--config.init.checkpoint (that file is already "
                    "exportable)")
  if not config.init.checkpoint:
    if not workdir_lib.has_checkpoints(workdir):
      raise checkpointing.no_checkpoint(workdir)
    workdir_lib.check_same_config(config, workdir)


def prepare(config,
            workdir: str,
            purpose: str,
            *,
            overwrite: bool = False) -> Setup:
  """Checks everything that can fail on user input and builds the run.

  Args:
    config: the command's config (configs/default.py's schema).
    workdir: the run's directory.
    purpose: "train" (train or resume), "eval" (evaluate the newest
      checkpoint, or `init.checkpoint`) or "export".
    overwrite: training starts the run over (checked to be a run).

  Raises:
    UserError: a bad config, workdir, data or checkpoint, before anything
      is compiled or written.
  """
  if purpose not in PURPOSES:
    raise ValueError(f"purpose={purpose!r}: one of {PURPOSES}")
  if purpose != "train":
    config = config_for_evaluation(config, workdir)
  validate.check_config(config, training=purpose == "train")
  if purpose != "eval":  # eval writes only its results, and survives not
    workdir_lib.check_writable(workdir)
  cache_dir = compilation.enable_cache(config.compilation_cache_dir)
  if overwrite:
    workdir_lib.check_is_a_run(workdir)
  mesh = parallel.make_mesh(config.num_devices)
  if purpose == "train":
    parallel.check_batch_size(config.batch_size, mesh)
  extra_rows = data_lib.extra_rows(
      config.data, config.batch_size,
      mesh.devices.size if purpose == "train" else 1)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  _check_workdir(config, workdir, purpose, overwrite)
  splits = data_lib.load(protocol.data_config(config),
                         with_extra=purpose == "train")
  validate.check_classes(config, splits.num_classes)
  model = state_lib.build_model(config, splits)
  precision.log_policy(
      config.matmul_precision, model.dtype,
      parallel.compute_dtype_for(config.eval.compute_dtype or
                                 config.compute_dtype))
  if config.tricks.prm:  # the image size may have come from the data
    objectives.check_prm_patch_size(config.tricks.prm_patch_size,
                                    model.img_size)
  steps_per_epoch = pipeline.steps_per_epoch(len(splits.train),
                                             config.batch_size - extra_rows)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                      steps_per_epoch, config.model.name)
  if purpose == "train":  # training 0 steps is an error; evaluating is not
    total_steps = validate.check_steps(config, steps_per_epoch)
    optim.log_lr_warning(config.optim, config.epochs)
    if param_groups.grouped(config.optim):  # shapes only: nothing compiled
      optim.log_param_groups(
          config.optim,
          state_lib.abstract_state(model, tx, config.seed).params)
  else:
    total_steps = optim.epochs_to_steps(config.epochs, steps_per_epoch)
  if config.init.checkpoint:
    pretrained.check(config.init.checkpoint, model, config.init.format,
                     config.init.allow_pickle)
  if purpose == "train" and not overwrite:
    checkpointing.check_same_data(workdir_lib.read_meta(workdir),
                                  steps_per_epoch, f"the run in {workdir!r}")
  return Setup(config=config,
               workdir=workdir,
               purpose=purpose,
               mesh=mesh,
               splits=splits,
               model=model,
               tx=tx,
               schedule=schedule,
               steps_per_epoch=steps_per_epoch,
               total_steps=total_steps,
               cache_dir=cache_dir,
               extra=pipeline.Extra(splits.extra, extra_rows)
               if splits.extra is not None else None)

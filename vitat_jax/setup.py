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
left out, so a new setup step is written once, here. Evaluation and export
read the test split alone.

`--mode=eval` of an external checkpoint (`init.checkpoint`) evaluates the
network as timm defines it (`native_eval`, with `pretrained.native`: the
model card beside the
file, else `model.name` and the weights' shapes, normalised as the card or
`pretrained.preprocessing`'s table says, or as an explicit `data.mean/std`
says). Test images of another size are refused in one line unless
`eval.resize_to_model` (the eval transform resizes them to the model's
size) or `init.resample` (the checkpoint is resampled to the data, as
training does, with a WARNING).
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import ml_collections

from vitat_jax import checkpointing
from vitat_jax import compilation
from vitat_jax import data as data_lib
from vitat_jax import native_eval
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
from vitat_jax.pretrained import native as native_lib

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
    native: for the evaluation of an external checkpoint as timm defines
      it, its `pretrained.native.NativeModel`; else None.
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
  native: Optional[native_lib.NativeModel] = None

  def shard(self, local_arrays):
    """A batch of this process's rows placed on the mesh, axis "data"."""
    return parallel.shard_batch(self.mesh, local_arrays)


def config_for_evaluation(cli_config, workdir: str):
  """The run's own config with the command's `eval`.

  The run's config is the one its newest checkpoint carries (config.json for
  runs saved before checkpoints carried it), completed with the fields added
  since; its `init.checkpoint` is cleared, since the file a run started from
  is not the run: the run's checkpoints are evaluated (also when the
  command names that same file again, as a paper config does). Without a
  recorded run, or when the command names another file in
  `init.checkpoint` (evaluating a converted checkpoint), the command's
  config is used as it is.
  """
  recorded, _ = workdir_lib.recorded_config(workdir)
  external = cli_config.init.checkpoint
  if recorded is None or (external and not _same_file(
      external, (recorded.get("init") or {}).get("checkpoint", ""))):
    return cli_config
  config = ml_collections.ConfigDict(
      workdir_lib.merge_run_config(cli_config.to_dict(),
                                   recorded,
                                   keep=("eval",)))
  config.init.checkpoint = ""
  return config


def _same_file(a: str, b: str) -> bool:
  return bool(b) and os.path.abspath(os.path.expanduser(a)) == os.path.abspath(
      os.path.expanduser(b))


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
    # The run's own config, its starting file cleared (config_for_evaluation).
    workdir_lib.check_same_config(config, workdir, ignore=("init.checkpoint",))


def _eval_steps_per_epoch(workdir: str) -> int:
  """The run's steps per epoch as its checkpoint records them (evaluation
  reads no train split; only the optimizer's schedule, which restores the
  state's shapes and is never stepped, uses it), else 1."""
  meta = workdir_lib.read_meta(workdir) if workdir_lib.has_checkpoints(
      workdir) else None
  recorded = (meta or {}).get("steps_per_epoch")
  return recorded if isinstance(recorded, int) and recorded > 0 else 1


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
  data_config = protocol.data_config(config)
  spec = None
  if purpose == "eval" and config.init.checkpoint:
    spec = native_eval.external_model(config)
    if not config.init.resample:
      data_config = native_eval.data_config(config, data_config, spec)
  splits = data_lib.load(data_config,
                         with_extra=purpose == "train",
                         train=purpose == "train")
  validate.check_classes(config, splits.num_classes)
  if spec is not None:  # the checkpoint's normalisation, not the data set's
    splits = dataclasses.replace(splits, mean=spec.mean, std=spec.std)
    if config.init.resample:
      spec = None  # the config's model, sized for the data
    else:
      config = native_eval.evaluated_config(config, spec, splits, data_config)
  model = state_lib.build_model(config, splits)
  precision.log_policy(
      config.matmul_precision, model.dtype,
      parallel.compute_dtype_for(config.eval.compute_dtype or
                                 config.compute_dtype))
  if config.tricks.prm and spec is None:  # the size may come from the data
    objectives.check_prm_patch_size(config.tricks.prm_patch_size,
                                    model.img_size)
  if splits.train is None:
    steps_per_epoch = _eval_steps_per_epoch(workdir)
  else:
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
    pretrained.check(config.init.checkpoint,
                     model,
                     config.init.format,
                     config.init.allow_pickle,
                     warn_resampling=purpose == "eval")
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
               if splits.extra is not None else None,
               native=spec)

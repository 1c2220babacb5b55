"""Command-line entry point: train and evaluate a config in a workdir.

    python main.py                                    # quickstart (digits)
    python main.py --config=configs/cifar10.py:model=deit_tiny_patch16_224,ard=True,prm=True \
                   --workdir=runs/x --config.optim.lr=0.05

Rerunning a command with the same workdir resumes from its latest checkpoint.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs/quickstart.py"),
    "Training configuration file (a get_config(arg) module).",
    lock_config=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "report"],
    "train: train (or resume) and evaluate; eval: evaluate the latest "
    "checkpoint in --workdir (or --config.init.checkpoint) with the "
    "config's `eval` section, writing robustness.json; report: plots of "
    "each --workdirs run and a table comparing them (reads files only).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Delete the workdir's checkpoints and metrics and "
    "start over, instead of resuming.")
_WORKDIRS = flags.DEFINE_list(
    "workdirs", None, "--mode=report: the run directories to plot and "
    "compare, comma-separated (default: --workdir).")
_REPORT_DIR = flags.DEFINE_string(
    "report_dir", None, "--mode=report: where comparison.md/.png go; "
    "default: <the runs' common parent>/comparison.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and metrics; default: "
    "runs/<config>_<model>_<method>[_ard][_prm].")
# Multi-host runs (one process per host); the JAX_* variables are the defaults.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-host run "
    "(default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-host run (default: "
    "$JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) "
    "(default: $JAX_PROCESS_ID).")
_AUTO_DISTRIBUTED = flags.DEFINE_bool(
    "auto_distributed", False, "Let JAX detect a managed cluster (Cloud TPU "
    "pod, SLURM, Open MPI) and join it.")


def default_workdir(config, config_path: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  parts = [stem, config.model.name, config.method]
  if config.method != "natural":
    parts += [trick for trick in ("ard", "prm") if config[trick]]
  return os.path.join("runs", "_".join(parts))


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's and JAX's INFO chatter out of the run's log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def _report():
  from vitat_jax import report
  from vitat_jax.errors import UserError
  workdirs = _WORKDIRS.value or ([_WORKDIR.value] if _WORKDIR.value else [])
  try:
    md_path, png_path, plots = report.make_report(workdirs, _REPORT_DIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  with open(md_path) as f:
    print(f.read())
  print("written: " + ", ".join([md_path, png_path, *plots]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _MODE.value == "report":  # files only: no JAX start-up
    _report()
    return
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  import jax
  from vitat_jax import parallel
  from vitat_jax import train
  from vitat_jax.errors import UserError

  try:
    # Before anything else touches JAX: the devices of all hosts form one mesh.
    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        auto=_AUTO_DISTRIBUTED.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from vitat_jax.preemption import Preempted

  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(
      config, config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    if _MODE.value == "eval":
      result = train.evaluate_checkpoint(
          train.config_for_evaluation(config, workdir), workdir)
    else:
      result = train.train_and_evaluate(config, workdir,
                                        overwrite=_OVERWRITE.value)
  except (UserError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f"{e} (workdir {workdir})", file=sys.stderr)
    sys.exit(e.exit_code)
  print(result["table"])
  if _MODE.value == "eval":
    print(f"evaluated {result['checkpoint']} in {result['wall_time_s']:.0f} s;"
          f" results in {os.path.join(workdir, 'robustness.json')}")
  else:
    print(f"train {result['train_time_s']:.0f} s, evaluation "
          f"{result['eval_time_s']:.0f} s, total {result['wall_time_s']:.0f} "
          f"s; metrics in {os.path.join(workdir, 'metrics.json')}")


if __name__ == "__main__":
  app.run(main)

"""Command-line entry point: train and evaluate a config in a workdir.

    python main.py                                    # quickstart (digits)
    python main.py --config=configs/cifar10.py:model=deit_tiny_patch16_224,ard=True,prm=True \
                   --workdir=runs/x --config.optim.lr=0.05
    python main.py --mode=config --config=configs/cifar10.py:ard=True  # print it

Rerunning a command with the same workdir resumes from its latest checkpoint.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vitat_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__),
                               "configs/quickstart.py")
if __name__ == "__main__" and not set(sys.argv[1:]) & set(cli.HELP_FLAGS):
  cli.check_command_line(sys.argv, _DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Training configuration file (a get_config(arg) module); fields are set "
    "with --config.<section>.<field>=value, listed in configs/default.py.",
    lock_config=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "report", "export", "config"],
    "train: train (or resume) and evaluate; eval: evaluate the latest "
    "checkpoint in --workdir (or --config.init.checkpoint) with the "
    "config's `eval` section, writing robustness.json; report: plots of "
    "each --workdirs run and a table comparing them (reads files only); "
    "export: the run's latest checkpoint as timm .safetensors weights and a "
    "JSON model card in <workdir>/export; config: print the resolved "
    "--config (with its --config.* overrides) as JSON and exit.")
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
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", 120, "Seconds a multi-host process waits for the "
    "coordinator and for every process to join before it stops with an "
    "error.")
_AUTO_DISTRIBUTED = flags.DEFINE_bool(
    "auto_distributed", False, "Let JAX detect a managed cluster (Cloud TPU "
    "pod, SLURM, Open MPI) and join it.")


def _report():
  from vitat_jax import report
  from vitat_jax.errors import UserError
  workdirs = _WORKDIRS.value or ([_WORKDIR.value] if _WORKDIR.value else [])
  try:
    md_path, png_path, plots = report.make_report(workdirs, _REPORT_DIR.value)
  except UserError as e:
    cli.fail(e)
  from etils import epath
  print(epath.Path(md_path).read_text())
  print("written: " + ", ".join([md_path, png_path, *plots]))


def main(argv):
  del argv  # checked by cli.parse_flags
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  cli.silence_event_loop_noise()
  if _MODE.value == "report":  # files only: no JAX start-up
    _report()
    return
  if _MODE.value == "config":  # no JAX start-up either
    cli.print_config(_CONFIG.value, sys.argv, _DEFAULT_CONFIG)
    return
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  import jax
  from vitat_jax import eval_only
  from vitat_jax import export
  from vitat_jax import parallel
  from vitat_jax import train
  from vitat_jax.errors import UserError

  # Before JAX makes its CPU client: several CPU devices on few cores need
  # a larger XLA thread pool, or an all-reduce can deadlock.
  parallel.configure_cpu_threads()
  try:
    # Before anything else touches JAX: the devices of all hosts form one mesh.
    parallel.initialize_distributed(_COORDINATOR.value,
                                    _NUM_PROCESSES.value,
                                    _PROCESS_ID.value,
                                    auto=_AUTO_DISTRIBUTED.value,
                                    timeout=_COORDINATOR_TIMEOUT.value)
  except UserError as e:
    cli.fail(e)
  from vitat_jax.preemption import Preempted

  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  config = _CONFIG.value
  workdir = _WORKDIR.value or cli.default_workdir(
      config, config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    if _MODE.value == "export":
      written = export.export_run(config, workdir)
      print(f"exported {written['weights']} and {written['card']} in "
            f"{written['wall_time_s']:.0f} s")
      return
    if _MODE.value == "eval":
      result = eval_only.evaluate_checkpoint(config, workdir)
    else:
      result = train.train_and_evaluate(config,
                                        workdir,
                                        overwrite=_OVERWRITE.value)
  except (UserError, FloatingPointError) as e:
    cli.fail(e)
  except Preempted as e:
    print(f"{e} (workdir {workdir})", file=sys.stderr)
    # Everything to keep is on disk (the checkpoint waited for, the metrics
    # flushed, the lock released). A signal that stopped the run at once
    # unwound through a running JAX call; the interpreter's teardown after
    # that can crash (SIGSEGV) and turn a clean stop into a failure, so it
    # is skipped.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.exit_code)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    full = cli.disk_full(e)
    lost = cli.storage_unreachable(e) if full is None else None
    if lost is not None:  # what was saved before is intact, as below
      cli.fail(
          f"the storage of workdir {workdir} cannot be reached ({lost}): "
          "rerun the same command when it is back; it resumes from the last "
          "checkpoint",
          code=1)
    if full is None:
      raise
    # What was written before is intact: checkpoints are atomic, the other
    # files are rewritten or trimmed on resume.
    cli.fail(
        f"the disk of workdir {workdir} is full ({full}): free space there "
        "and rerun the same command; it resumes from the last checkpoint",
        code=1)
  print(result["table"])
  if _MODE.value == "eval":
    where = ("not written: " + result["write_error"] if "write_error" in result
             else "results in " + os.path.join(workdir, "robustness.json"))
    print(f"evaluated {result['checkpoint']} in {result['wall_time_s']:.0f} s;"
          f" {where}")
  else:
    print(f"train {result['train_time_s']:.0f} s, evaluation "
          f"{result['eval_time_s']:.0f} s, total {result['wall_time_s']:.0f} "
          f"s; metrics in {os.path.join(workdir, 'metrics.json')}")


if __name__ == "__main__":
  app.run(main,
          flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, __doc__ or
                                                    "", _DEFAULT_CONFIG))

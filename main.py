"""Command-line entry point: train and evaluate a config in a workdir.

    python main.py                                    # quickstart (digits)
    python main.py --config=configs/cifar10.py:model=deit_tiny_patch16_224,ard=True,prm=True \
                   --workdir=runs/x --config.optim.lr=0.05

Rerunning a command with the same workdir resumes from its latest checkpoint.
"""

import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__),
                               "configs/quickstart.py")
_HELP = """
Config fields: every field of the config can be set on the command line with
  --config.<section>.<field>=value     e.g. --config.optim.lr=0.05,
  --config.epochs=10, --config.eval.attacks="('clean','pgd20')"
The fields, their defaults and what they mean are listed in
configs/default.py; the paper's configs (configs/cifar10.py, imagenet.py,
imagenette.py, studies.py, quickstart.py) take `:key=value,...` arguments
described at the top of each file, e.g.
  --config=configs/cifar10.py:model=deit_small_patch16_224,ard=True
Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving: rerun to
resume), 2 a bad flag, config, input or workdir (one `error:` line).
"""


def _fail(message: str) -> None:
  """The one-line error for a user's mistake, exit code 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(2)


def _config_argument(argv):
  """The --config value on the command line (the last one), or the default."""
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _field_paths(tree, prefix=""):
  for key in tree.keys():
    value = tree[key]
    yield prefix + key
    if hasattr(value, "keys") and not isinstance(value, str):
      yield from _field_paths(value, prefix + key + ".")


def _check_command_line(argv):
  """The config file, its `:arg` and every --config.<field> name, checked
  before the flags are defined (ml_collections fails there with tracebacks).
  """
  spec = _config_argument(argv)
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    _fail(f"config file {path!r} (--config={spec}) does not exist: pass a "
          "get_config() module such as configs/cifar10.py")
  try:
    module_spec = importlib.util.spec_from_file_location("_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      _fail(f"config file {path!r} has no get_config(): pass a config module "
            "such as configs/cifar10.py")
    config = module.get_config(arg) if ":" in spec else module.get_config()
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config={spec}: {e}" if isinstance(e, (ValueError, KeyError)) else
          f"config file {path!r} cannot be loaded ({type(e).__name__}: "
          f"{e}): fix it or pass another --config")
  fields = list(_field_paths(config))
  for arg in argv[1:]:
    match = re.match(r"--config\.([^=]+)(=|$)", arg)
    if not match or match.group(1) in fields:
      continue
    name = match.group(1)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    _fail(f"--config.{name}: the config has no field {name!r}; {hint}the "
          "fields are listed in configs/default.py")


_HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
if __name__ == "__main__" and not set(sys.argv[1:]) & set(_HELP_FLAGS):
  _check_command_line(sys.argv)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Training configuration file (a get_config(arg) module); fields are set "
    "with --config.<section>.<field>=value, listed in configs/default.py.",
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
    parts += [trick for trick in ("ard", "prm") if config.tricks[trick]]
  return os.path.join("runs", "_".join(parts))


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's and JAX's INFO chatter out of the run's log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def _is_event_loop_noise(exc_type, exc, tb) -> bool:
  """Tensorstore callbacks racing orbax's closed event loop after a failed
  restore: harmless, but printed as hundreds of tracebacks that bury the
  fallback warnings."""
  del tb
  return (exc_type is RuntimeError and str(exc) == "Event loop is closed")


def _silence_event_loop_noise():
  previous_excepthook = sys.excepthook
  previous_unraisable = sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_event_loop_noise(exc_type, exc, tb):
      previous_excepthook(exc_type, exc, tb)

  def unraisablehook(info):
    if not _is_event_loop_noise(info.exc_type, info.exc_value,
                                info.exc_traceback):
      previous_unraisable(info)

  sys.excepthook = excepthook
  sys.unraisablehook = unraisablehook


def _report():
  from vitat_jax import report
  from vitat_jax.errors import UserError
  workdirs = _WORKDIRS.value or ([_WORKDIR.value] if _WORKDIR.value else [])
  try:
    md_path, png_path, plots = report.make_report(workdirs, _REPORT_DIR.value)
  except UserError as e:
    _fail(e)
  with open(md_path) as f:
    print(f.read())
  print("written: " + ", ".join([md_path, png_path, *plots]))


def _parse_flags(argv):
  """absl's flag parsing with --help exiting 0 and flag errors in one line."""
  if set(argv[1:]) & set(_HELP_FLAGS):
    print((__doc__ or "") + _HELP)
    print("Flags:\n" + flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value  # pylint: disable=pointless-statement
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"{e}; see --help (config fields: configs/default.py)")
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])}; flags take the form "
          "--name=value (see --help)")
  return rest


def main(argv):
  del argv  # checked by _parse_flags
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _silence_event_loop_noise()
  if _MODE.value == "report":  # files only: no JAX start-up
    _report()
    return
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  import jax
  from vitat_jax import eval_only
  from vitat_jax import parallel
  from vitat_jax import train
  from vitat_jax.errors import UserError

  try:
    # Before anything else touches JAX: the devices of all hosts form one mesh.
    parallel.initialize_distributed(_COORDINATOR.value,
                                    _NUM_PROCESSES.value,
                                    _PROCESS_ID.value,
                                    auto=_AUTO_DISTRIBUTED.value)
  except UserError as e:
    _fail(e)
  from vitat_jax.preemption import Preempted

  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(
      config, config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    if _MODE.value == "eval":
      result = eval_only.evaluate_checkpoint(
          eval_only.config_for_evaluation(config, workdir), workdir)
    else:
      result = train.train_and_evaluate(config,
                                        workdir,
                                        overwrite=_OVERWRITE.value)
  except (UserError, FloatingPointError) as e:
    _fail(e)
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
  app.run(main, flags_parser=_parse_flags)

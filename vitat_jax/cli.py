"""The command line's checks and messages, before and around absl (no JAX).

`main.py` defines the flags and calls these: the config file and every
`--config.<field>` name checked before the flags exist (ml_collections
fails there with tracebacks), one-line `error:` exits, `--help`, and the
log filters of a run.
"""

import difflib
import errno
import importlib.util
import logging as std_logging
import os
import re
import sys
import threading
from typing import Optional

from absl import flags

from vitat_jax import model_names

HELP = """
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
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def fail(message: str, code: int = 2) -> None:
  """The one-line error for a user's mistake (exit code 2), or for what the
  machine refused (`code` 1)."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(code)


def disk_full(error: BaseException) -> Optional[str]:
  """The first line of the full-disk error in `error`'s chain (an OSError
  with ENOSPC, or a tensorstore error naming it), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC or
        "No space left on device" in str(error)):
      lines = str(error).strip().splitlines() or ["No space left on device"]
      return lines[0][:300]
    error = error.__cause__ or error.__context__
  return None


# Errors of a storage server that cannot be reached (connection refused or
# reset, host or network unreachable, timed out), by errno or by class name
# (aiohttp's, under gcsfs, and tensorstore's UNAVAILABLE).
_UNREACHABLE_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.ETIMEDOUT, errno.ECONNABORTED)
_UNREACHABLE_CLASSES = ("ClientConnectorError", "ServerDisconnectedError",
                        "ClientOSError", "ServerTimeoutError")
_UNREACHABLE_TEXT = re.compile(r"\bUNAVAILABLE: |Connection refused|"
                               r"Failed to connect to")


def storage_unreachable(error: BaseException) -> Optional[str]:
  """The first line of a storage server's connection error in `error`'s
  chain (a workdir on GCS whose server went away), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno in _UNREACHABLE_ERRNOS or
        type(error).__name__ in _UNREACHABLE_CLASSES or
        _UNREACHABLE_TEXT.search(str(error))):
      lines = str(error).strip().splitlines() or [type(error).__name__]
      return lines[0][:300]
    error = error.__cause__ or error.__context__
  return None


def _config_argument(argv, default: str):
  """The --config value on the command line (the last one), or `default`."""
  value = default
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


def _load_config_module(path: str):
  module_spec = importlib.util.spec_from_file_location("_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def check_command_line(argv, default_config: str):
  """The config file, its `:arg` and every --config.<field> name, checked
  before the flags are defined (ml_collections fails there with tracebacks).
  """
  spec = _config_argument(argv, default_config)
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    fail(f"config file {path!r} (--config={spec}) does not exist: pass a "
         "get_config() module such as configs/cifar10.py")
  try:
    module = _load_config_module(path)
    if not hasattr(module, "get_config"):
      fail(f"config file {path!r} has no get_config(): pass a config module "
           "such as configs/cifar10.py")
    config = module.get_config(arg) if ":" in spec else module.get_config()
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--config={spec}: {e}" if isinstance(e, (ValueError, KeyError)) else
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
    fail(f"--config.{name}: the config has no field {name!r}; {hint}the "
         "fields are listed in configs/default.py")


def config_arguments(argv, default_config: str) -> str:
  """The `:key=value` arguments the --config file takes (its `ARGS` table),
  one per line under a header; '' for a file without arguments."""
  path = _config_argument(argv, default_config).partition(":")[0]
  try:
    arguments = getattr(_load_config_module(path), "ARGS", None)
  except Exception:  # pylint: disable=broad-except
    return ""  # check_command_line reports a broken file
  if not arguments:
    return ""
  width = max(map(len, arguments))
  lines = [f"  {key:<{width}}  {what}" for key, what in arguments.items()]
  return "\n".join(
      [f"Arguments of {path} (--config={path}:key=value,...):", *lines])


def print_config(config, argv, default_config: str) -> None:
  """--mode=config: the resolved config as JSON on stdout; the config
  file's `:arg` keys, as `# ` lines, on stderr (stdout stays JSON)."""
  arguments = config_arguments(argv, default_config)
  if arguments:
    print("\n".join("# " + line for line in arguments.splitlines()),
          file=sys.stderr)
  print(config.to_json_best_effort(indent=2, sort_keys=True))


def default_workdir(config, config_path: str) -> str:
  """runs/<config>_<model>[-<variant>]_<method>[_ard][_prm]: the variant
  (`model_names.variant`) when the shape fields make the model another
  network than its timm name. A run started under the name without the
  variant (before it was added) keeps its workdir, so its command resumes."""
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  tricks = ([trick for trick in ("ard", "prm") if config.tricks[trick]]
            if config.method != "natural" else [])
  variant = model_names.variant(config)
  model = config.model.name + (f"-{variant}" if variant else "")
  path = os.path.join("runs", "_".join([stem, model, config.method, *tricks]))
  legacy = os.path.join(
      "runs", "_".join([stem, config.model.name, config.method, *tricks]))
  if variant and not os.path.exists(path) and os.path.isdir(
      os.path.join(legacy, "checkpoints")):
    return legacy
  return path


def sibling_read_error(record) -> bool:
  """asyncio's "... exception was never retrieved" for a tensorstore error:
  when a checkpoint cannot be read, its arrays' reads fail together; orbax
  raises the first (the caller reports it in one line: `checkpointing`'s
  fallback warning, then main.py's error) and asyncio prints the others as
  tracebacks when it collects their tasks."""
  return bool(record.name == "asyncio" and record.exc_info and
              record.exc_info[1] is not None and
              "never retrieved" in str(record.msg) and
              "tensorstore_spec=" in str(record.exc_info[1]))


class QuietLibraries(std_logging.Filter):
  """Keeps orbax's and JAX's INFO chatter, every library's tracebacks of a
  full disk (orbax's save threads, asyncio's "Task exception was never
  retrieved"), the tracebacks of a failed checkpoint read's sibling reads
  (`sibling_read_error`), and gcsfs's fallback notes when no credentials
  are set, out of the run's log."""

  def filter(self, record):
    if sibling_read_error(record):
      return False
    if record.name == "gcsfs" and str(
        record.msg).startswith("Could not determine bucket type"):
      return False  # each GCS call without credentials: falls back, works
    if (record.exc_info and disk_full(record.exc_info[1]) or
        "No space left on device" in str(record.msg)):
      return False  # a full disk: main.py says so in one line
    if record.exc_info and storage_unreachable(record.exc_info[1]):
      return False  # gcsfs's retries given up: the caller says it in one line
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def _is_event_loop_noise(exc_type, exc, tb) -> bool:
  """Tensorstore callbacks racing orbax's closed event loop after a failed
  restore: harmless, but printed as hundreds of tracebacks that bury the
  fallback warnings."""
  del tb
  return (exc_type is RuntimeError and str(exc) == "Event loop is closed" or
          exc is not None and
          (disk_full(exc) is not None or storage_unreachable(exc) is not None))


def silence_event_loop_noise():
  """Drops the harmless event-loop tracebacks above, and those of a full
  disk or an unreachable storage server from background threads (main.py
  reports them in one line)."""
  previous_excepthook = sys.excepthook
  previous_unraisable = sys.unraisablehook
  previous_thread_hook = threading.excepthook

  def thread_hook(args):
    if not _is_event_loop_noise(args.exc_type, args.exc_value,
                                args.exc_traceback):
      previous_thread_hook(args)

  def excepthook(exc_type, exc, tb):
    if not _is_event_loop_noise(exc_type, exc, tb):
      previous_excepthook(exc_type, exc, tb)

  def unraisablehook(info):
    if not _is_event_loop_noise(info.exc_type, info.exc_value,
                                info.exc_traceback):
      previous_unraisable(info)

  sys.excepthook = excepthook
  sys.unraisablehook = unraisablehook
  threading.excepthook = thread_hook


def parse_flags(argv, config_flag, usage: str, default_config: str = ""):
  """absl's flag parsing with --help exiting 0 (listing the --config
  file's `:arg` keys) and flag errors in one line."""
  if set(argv[1:]) & set(HELP_FLAGS):
    print(usage + HELP)
    arguments = default_config and config_arguments(argv, default_config)
    if arguments:
      print(arguments + "\n")
    print("Flags:\n" + flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    config_flag.value  # pylint: disable=pointless-statement
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    fail(f"{e}; see --help (config fields: configs/default.py)")
  if len(rest) > 1:
    fail(f"unexpected arguments: {' '.join(rest[1:])}; flags take the form "
         "--name=value (see --help)")
  return rest

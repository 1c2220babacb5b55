"""A run's workdir: its layout, the files in it, and the run lock.

This module owns the workdir (JAX-free, so reports read runs without it):

    <workdir>/config.json       the resolved config (a copy for people; the
                                checkpoints carry the one resume checks)
    <workdir>/checkpoints/<step>/{state,meta}   orbax (state.py)
    <workdir>/metrics.jsonl     one record per log step (metric_writers.py)
    <workdir>/tensorboard/      the same scalars as TensorBoard events
    <workdir>/metrics.json      the final evaluation of a training run
    <workdir>/robustness.{json,md}  the latest evaluation (report.py)
    <workdir>/*.png             plots (plots.py)
    <workdir>/log.txt, adversarial/<attack>.npz   AutoAttack's log, examples
    <workdir>/run.lock          held by the training run writing the workdir

Everything a run writes that a later run reads (config.json, metrics.json,
robustness.json) is written to a temporary file and renamed over the old one,
so a SIGKILL or a full disk never leaves half a file. Only one training run
may write a workdir at a time: `lock` holds an exclusive `flock` on
`<workdir>/run.lock` (which names the host and PID of the holder) for the
whole run. The kernel releases it when the process dies, so a lock left by a
killed run is stale and simply taken over.

A workdir may be on cloud storage (`gs://bucket/run`, any scheme `etils.epath`
knows): every file here goes through `epath`, and nothing is made absolute
but a local path. An object store writes each object whole, so there a
plain write is already atomic; it has no `flock`, so a cloud workdir is not
locked (the log says so), and `metrics.jsonl`, which cannot be appended to,
is rewritten whole at each record (`metric_writers.py`).
"""

import contextlib
import copy
import errno
import fcntl
import json
import os
import re
import secrets
import socket
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath

from vitat_jax import model_names
from vitat_jax.errors import UserError

try:
  import fsspec  # pylint: disable=g-import-not-at-top
  # Orbax writes a checkpoint's arrays through tensorstore, beside gcsfs:
  # a cached listing would not show them (nor a step another host wrote),
  # so cloud folders are listed afresh each time.
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache",
                                                     False)
except ImportError:  # no cloud file systems installed
  pass

CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
METRICS_JSONL = "metrics.jsonl"
ROBUSTNESS_JSON = "robustness.json"
ROBUSTNESS_MD = "robustness.md"
PLOTS = ("learning_curves.png", "schedules.png", "robustness.png")
AUTOATTACK_LOG = "log.txt"
ADVERSARIAL_DIR = "adversarial"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_CHECKPOINTS_DIR = "unreadable_checkpoints"
LOCK_NAME = "run.lock"
# What `start_over` deletes (checkpoints and TensorBoard events included).
RUN_FILES = (CONFIG_JSON, METRICS_JSON, METRICS_JSONL, ROBUSTNESS_JSON,
             ROBUSTNESS_MD, *PLOTS)


def is_local(workdir: str) -> bool:
  """False for a URI with a scheme (`gs://...`), True for a local path."""
  return "://" not in str(workdir)


def resolve(workdir: str) -> str:
  """A local workdir made absolute (what orbax needs); a URI as it is."""
  workdir = str(workdir)
  return os.path.abspath(workdir) if is_local(workdir) else workdir


def path(workdir: str, name: str) -> str:
  """`<workdir>/<name>`, for the names above (a URI stays a URI)."""
  return str(epath.Path(workdir) / name)


def makedirs(directory: str) -> None:
  """`mkdir -p` (on an object store, where folders are implicit, nothing)."""
  epath.Path(directory).mkdir(parents=True, exist_ok=True)


def check_writable(workdir: str) -> None:
  """One-line error if `workdir` cannot be created or written (no writes)."""
  if not is_local(workdir):
    _check_reachable(workdir)
    return
  path = os.path.abspath(workdir)
  _check_name_lengths(workdir, path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {workdir!r} is a file, not a directory: pass "
                    "another --workdir")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"workdir {workdir!r} is under {parent!r}, which is a "
                    "file: pass another --workdir")
  if not os.access(parent, os.W_OK | os.X_OK):
    what = "workdir" if parent == path else "directory above the workdir"
    raise UserError(f"{what} {parent!r} is not writable: fix its permissions"
                    " or pass another --workdir")


def _check_name_lengths(workdir: str, path: str) -> None:
  """One-line error for a workdir path the file system cannot hold: a name
  over NAME_MAX bytes or, with the longest name a run writes inside, a path
  over PATH_MAX (no writes)."""
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    path_max = os.pathconf(existing, "PC_PATH_MAX")
  except (OSError, ValueError):
    name_max, path_max = 255, 4096
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > name_max:
      raise UserError(f"workdir {workdir!r} has a name of "
                      f"{len(os.fsencode(part))} bytes ({part[:20]}...), over "
                      f"the file system's limit of {name_max}: pass a shorter "
                      "--workdir")
  # What a run writes inside: checkpoints/<step>.orbax-checkpoint-tmp-<t>/...
  inside = 160
  if len(os.fsencode(path)) + inside > path_max:
    raise UserError(f"workdir {workdir[:40]!r}... is a path of "
                    f"{len(os.fsencode(path))} bytes; with the files a run "
                    f"writes inside it exceeds the limit of {path_max} bytes: "
                    "pass a shorter --workdir")


def check_output(workdir: str,
                 name: str,
                 *,
                 folder: bool = False,
                 why: str = "",
                 writable: bool = False) -> None:
  """One-line error unless `<workdir>/<name>` (e.g. "export/model_card.json",
  a `folder` if asked) can be written inside the workdir: no part of it a
  symbolic link (a write would land wherever the link points, outside the
  workdir), no folder where a file goes nor a file where a folder goes, and,
  if `writable`, its nearest existing part writable. `why` names what writes
  there. No writes; a cloud workdir has no links and is not checked."""
  if not is_local(workdir):
    return
  why = f" ({why})" if why else ""
  current = os.path.abspath(workdir)
  parts = name.split("/")
  for i, part in enumerate(parts):
    parent, current = current, os.path.join(current, part)
    is_folder = folder or i < len(parts) - 1
    if os.path.islink(current):
      raise UserError(
          f"{current} is a symbolic link (to {os.readlink(current)}): this "
          f"program writes there{why}, which would write outside the "
          "workdir; remove the link or pass another --workdir")
    if not os.path.lexists(current):
      current = parent
      break
    if is_folder != os.path.isdir(current):
      what = "file" if is_folder else "folder"
      raise UserError(
          f"{current} is a {what} where this program writes a "
          f"{'folder' if is_folder else 'file'}{why}: move it away or pass "
          "another --workdir")
  while not os.path.lexists(current):  # the workdir itself may not exist
    current = os.path.dirname(current)
  if writable and os.path.isdir(current) and not os.access(
      current, os.W_OK | os.X_OK):
    raise UserError(f"{current} is not writable{why}: fix its permissions or "
                    "pass another --workdir")


def check_run_outputs(workdir: str) -> None:
  """`check_output` of what a training run appends to or writes through
  (TensorBoard's folder, metrics.jsonl, the plots); the files written by a
  rename (config.json, metrics.json, robustness.*) replace a link instead
  of following it."""
  check_output(workdir, TENSORBOARD_DIR, folder=True)
  for name in (METRICS_JSONL, *PLOTS):
    check_output(workdir, name)


def _check_reachable(workdir: str) -> None:
  """One-line error if a cloud workdir's store cannot be reached (no writes)."""
  try:
    target = epath.Path(workdir)
    if target.exists() and not target.is_dir():
      raise UserError(f"workdir {workdir!r} is an object, not a folder: pass "
                      "another --workdir")
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # No backend for the scheme (ImportError), no credentials, no network.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"workdir {workdir!r} cannot be reached ({first}): check "
                    "the URI, that its file system is installed (gs://: pip "
                    "install gcsfs) and your credentials") from None


def jsonable(value: Any) -> Any:
  """`value` as plain JSON data: numpy / JAX scalars and arrays (anything
  with `tolist`) inside dicts, lists and tuples become Python numbers and
  lists; mapping keys become strings."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  if hasattr(value, "tolist"):
    return jsonable(value.tolist())
  return value


def write_json(path: str, value: Any, **kwargs) -> None:
  """`json.dump(jsonable(value))` to `path` atomically (temp file + rename)."""
  write_text(path, json.dumps(jsonable(value), **kwargs))


def write_text(path: str, text: str) -> None:
  """`text` to `path` atomically (temp file + rename; an object store writes
  an object whole)."""
  if not is_local(path):
    epath.Path(path).write_text(text)
    return
  fd, tmp = _create_temp(path)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _create_temp(path: str) -> Tuple[int, str]:
  """(fd, name) of a new file beside `path`, with the mode a plain `open`
  gives (0666 less the umask), where `tempfile.mkstemp` would give 0600."""
  directory = os.path.dirname(os.path.abspath(path))
  prefix = os.path.basename(path) + "."
  while True:
    tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except FileExistsError:
      continue


def read_json(path: str):
  """The JSON value in `path`, or None if it is missing or unreadable."""
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return None


def holder(workdir: str) -> str:
  """'PID p on host h' from the lock file, or '' if there is none."""
  if not is_local(workdir):
    return ""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      return f.read().strip()
  except OSError:
    return ""


def is_locked(workdir: str) -> bool:
  """Whether a live process holds the workdir's lock (no writes)."""
  if not is_local(workdir):
    return False
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      return True
    raise
  finally:
    os.close(fd)  # closing drops a lock taken here
  return False


def _refuse(workdir: str):
  who = holder(workdir) or "another process"
  raise UserError(f"workdir {workdir!r} is in use by a running training "
                  f"({who}): wait for it to finish, or pass another --workdir")


def check_unlocked(workdir: str) -> None:
  """One-line error if a live run holds `workdir` (no writes)."""
  if is_locked(workdir):
    _refuse(workdir)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/run.lock` for the block; refuses a live holder.

  A lock file left by a dead process is stale (its flock died with it) and
  is taken over. The file is removed when the block ends. A workdir on an
  object store has no `flock`: it is not locked, and the log says so.
  """
  if not is_local(workdir):
    logging.warning(
        "workdir %s is on cloud storage, where it cannot be locked: do not "
        "start a second run in it while this one runs", workdir)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      _refuse(workdir)
    raise
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)


# ----------------------------------------------------------- checkpoints ---
# What orbax leaves in `checkpoints/`, read as files (no orbax, no JAX).


def checkpoints_dir(workdir: str) -> str:
  return path(resolve(workdir), CHECKPOINTS_DIR)


def _names(directory: str) -> Optional[List[str]]:
  """The entries of `directory`, or None if it is not a folder."""
  folder = epath.Path(directory)
  if not folder.is_dir():
    return None
  return [p.name for p in folder.iterdir()]


_COMMIT_SUCCESS = "commit_success.txt"
_ORBAX_ENTRY = re.compile(r"^\d+(\.orbax-checkpoint-tmp.*)?$")


def check_is_a_run(workdir: str) -> None:
  """One-line error unless `checkpoints/` holds only orbax steps (no writes).

  `--overwrite` deletes the folder: it must be this program's.
  """
  directory = checkpoints_dir(workdir)
  if is_local(directory) and os.path.islink(directory):
    raise UserError(f"{directory} is a symbolic link (to "
                    f"{os.readlink(directory)}): --overwrite deletes this "
                    "folder and would delete outside the workdir; remove the "
                    "link, or pass another --workdir")
  if not epath.Path(directory).exists():
    return
  names = _names(directory)
  if names is None:
    raise UserError(f"{directory} is a file, not a checkpoints folder: move "
                    "it away or pass another --workdir")
  foreign = sorted(n for n in names if not _ORBAX_ENTRY.match(n))
  if foreign:
    raise UserError(f"{directory} holds {foreign[0]!r}, which is not a "
                    "checkpoint of a run: --overwrite deletes this folder, "
                    "so move it away or pass another --workdir")


def saved_steps(workdir: str) -> List[int]:
  """The finished steps in `checkpoints/`, newest first (no writes)."""
  directory = checkpoints_dir(workdir)
  steps = [int(n) for n in _names(directory) or [] if n.isdigit()]
  if not is_local(directory):
    # No renames on an object store: orbax marks a finished step with a
    # file, and a step folder without it is a save cut short.
    steps = [
        s for s in steps
        if (epath.Path(directory) / str(s) / _COMMIT_SUCCESS).exists()
    ]
  return sorted(steps, reverse=True)


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds any finished checkpoint (without creating it)."""
  return bool(saved_steps(workdir))


# The checkpoint meta item's record of the model's data-dependent fields
# (`state.ModelInputs`: image_size, num_classes, mean, std), written since
# 2026-12-05; older runs' are inferred (`vitat_jax.api.load_run`).
MODEL_INPUTS = "model_inputs"


def meta_of_step(workdir: str, step: int) -> Optional[dict]:
  """The `meta` item of the checkpoint of `step`, if it is readable JSON."""
  meta = read_json(
      str(
          epath.Path(checkpoints_dir(workdir)) / str(step) / "meta" /
          "metadata"))
  return meta if isinstance(meta, dict) else None


def read_meta(workdir: str) -> Optional[dict]:
  """The `meta` item of the newest checkpoint where it is readable JSON: the
  seed, the input position (`steps_per_epoch`, `epoch`, `index_in_epoch`),
  the run's resolved config and, since 2026-12-05, `MODEL_INPUTS`."""
  for step in saved_steps(workdir):
    meta = meta_of_step(workdir, step)
    if meta is not None:
      return meta
  return None


def start_over(workdir: str) -> None:
  """Deletes a run's checkpoints, metrics, reports and plots (--overwrite).

  In a multi-host run only process 0 calls this (`train.py`), then all wait.
  """
  for folder in (checkpoints_dir(workdir), path(workdir, TENSORBOARD_DIR)):
    if epath.Path(folder).exists():
      epath.Path(folder).rmtree()
  for name in RUN_FILES:
    epath.Path(path(workdir, name)).unlink(missing_ok=True)


# --------------------------------------------------------- the run config ---


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_as_dict(config) -> dict:
  """The resolved config as plain JSON data (what checkpoints carry)."""
  return json.loads(config.to_json_best_effort())


# (field before the `tricks` section, its name there)
_TRICKS_FIELDS = (("ard", "ard"), ("prm", "prm"), ("warmup_epochs",
                                                   "warmup_epochs"),
                  ("drop_rate", "final_keep_rate"), ("prm_patch_size",
                                                     "prm_patch_size"))
_PATCH_IN_NAME = re.compile(r"_patch(\d+)_")


def upgrade_run_config(previous: dict) -> dict:
  """An older run's config with the fields added since, as they ran.

  The tricks' settings were top-level fields before the `tricks` section
  (`drop_rate` is `tricks.final_keep_rate`). Runs written before
  `prm_patch_size` masked the model's own patch grid (the model's
  `patch_size`, else the one its timm name states; ConViT's is 16), and
  before `model.weight_init` were initialised Xavier-uniform; `optim.nesterov`,
  `b1` and `b2` were read with their defaults before they were declared, and
  the piecewise lr dropped at E - 5 and E - 2 before `optim.milestones`;
  an image folder's mean/std came from its folder's name before `data.stats`
  (`_stats_as_trained`); a momentum equal to the model family's is None;
  float32 dots ran at the backend default before `matmul_precision`; AdamW
  decayed every param before `optim.no_decay` (and no lr was scaled per
  layer); no run averaged its params (`ema`) or warmed its eps up before
  those fields, nor mixed extra data into its batches (`data.extra`),
  and every run trained against PGD before `attack.name`.
  Fields added later whose default is the old behaviour are filled in by
  `merge_run_config`.
  """
  previous = copy.deepcopy(previous)
  model = previous.setdefault("model", {})
  tricks = previous.setdefault("tricks", {})
  for old, new in _TRICKS_FIELDS:
    if old in previous:
      tricks.setdefault(new, previous.pop(old))
  if "prm_patch_size" not in tricks:
    match = _PATCH_IN_NAME.search(model.get("name", "") + "_")
    tricks["prm_patch_size"] = model.get("patch_size") or (int(match.group(1))
                                                           if match else 16)
  model.setdefault("weight_init", "xavier_uniform")
  # Declared since; the optimiser read them with these defaults before.
  optim = previous.setdefault("optim", {})
  for field, value in (("nesterov", False), ("b1", 0.9), ("b2", 0.999),
                       ("milestones", [5.0, 2.0]), ("milestones_from", "end")):
    optim.setdefault(field, value)
  # AdamW decayed every param before `optim.no_decay` (SGD still does), and
  # no run scaled its lr by layer.
  optim.setdefault("no_decay", "none" if optim.get("name") == "adamw" else "")
  optim.setdefault("no_decay_extra", [])
  optim.setdefault("layer_decay", 0.0)
  # optim.momentum None = the model family's (model_names.sgd_momentum): a
  # recorded momentum equal to its family's is that; another one (a Swin
  # named by --config.model.name before the family rule, 0.9) stays.
  if optim.get("momentum") == model_names.sgd_momentum(None,
                                                       model.get("name", "")):
    optim["momentum"] = None
  data = previous.setdefault("data", {})
  if "stats" not in data:
    data["stats"] = _stats_as_trained(data)
  previous.setdefault("init", {}).setdefault("source", "")
  # Training resampled then as now; the field governs only --mode=eval.
  previous["init"].setdefault("resample", False)
  # Runs before the precision policy ran float32 dots at the backend's
  # default, which "auto" keeps for training on CPU and GPU.
  previous.setdefault("matmul_precision", "auto")
  # No weight averaging and no epsilon warm-up before either existed.
  ema = previous.setdefault("ema", {})
  ema.setdefault("decay", 0.0)
  ema.setdefault("warmup", False)
  attack = previous.setdefault("attack", {})
  attack.setdefault("eps_warmup_epochs", 0.0)
  attack.setdefault("eps_warmup_floor", 0.0)
  attack.setdefault("name", "pgd")  # PGD was the only training attack
  # No extra training data before data.extra existed.
  data = previous.setdefault("data", {})
  data.setdefault("extra", "")
  data.setdefault("extra_fraction", 0.0)
  return previous


def _stats_as_trained(data: dict) -> str:
  """The data.stats of a run saved before the field: an image folder's
  statistics came from its folder's name then (CIFAR-100's or CIFAR-10's
  when the name says so, else ImageNet's, which "" gives a folder now); the
  other sources' are still what "" gives."""
  if data.get("name") != "image_folder" or not data.get("root"):
    return ""
  name = os.path.basename(os.path.realpath(data["root"]))
  compact = name.lower().replace("-", "").replace("_", "")
  for stats in ("cifar100", "cifar10"):
    if stats in compact:
      return stats
  return ""


def recorded_config(
    workdir: str,
    step: Optional[int] = None) -> Tuple[Optional[dict], Optional[str]]:
  """(the run's config dict, upgraded; where it came from) or (None, None).

  The newest readable checkpoint (or that of `step`) carries the config it
  was trained with; config.json (a copy for people) is only used when no
  checkpoint has one.
  """
  meta = read_meta(workdir) if step is None else meta_of_step(workdir, step)
  if meta and isinstance(meta.get("config"), dict):
    return upgrade_run_config(meta["config"]), "its checkpoints"
  previous = read_json(path(workdir, CONFIG_JSON))
  if isinstance(previous, dict):
    return upgrade_run_config(previous), CONFIG_JSON
  return None, None


def merge_run_config(current: dict, recorded: dict,
                     keep: Tuple[str, ...] = ()) -> dict:
  """A run's recorded config, completed by `current` (the command's config
  as a dict) with the fields added since the run, and with `current`'s
  sections named in `keep` (e.g. "eval") instead of the run's."""
  merged = copy.deepcopy(recorded)
  for key, value in flatten(current).items():
    parents, _, field = key.rpartition(".")
    section = merged
    for parent in filter(None, parents.split(".")):
      section = section.setdefault(parent, {})
    if field not in section:
      section[field] = copy.deepcopy(value)
  for section in keep:  # top-level sections, whole
    merged[section] = copy.deepcopy(current[section])
  return merged


# Fields that may change between a run and its resumption (prefixes).
# (init.source only says where the weights came from; matmul_precision,
# added later, is how the same computation is rounded; init.resample is read
# by --mode=eval alone.)
_RESUMABLE_KEYS = ("eval", "log_every_steps", "checkpoint_every_steps",
                   "checkpoint_every_minutes", "checkpoint_every_epochs",
                   "compilation_cache_dir", "keep_checkpoints",
                   "data.cache_dir", "init.source", "matmul_precision",
                   "device_memory_gb", "init.resample")


def _run_defining(config_dict: dict) -> Dict[str, Any]:
  return {
      k: v
      for k, v in flatten(config_dict).items()
      if not any(k == r or k.startswith(r + ".") for r in _RESUMABLE_KEYS)
  }


def check_same_config(config, workdir: str, ignore: Tuple[str,
                                                          ...] = ()) -> None:
  """Refuses a workdir holding a run with a different config (no writes);
  the flat keys in `ignore` may differ."""
  previous, source = recorded_config(workdir)
  if previous is None:
    return
  old, new = _run_defining(previous), _run_defining(config_as_dict(config))
  changed = sorted(k for k in set(old) | set(new)
                   if old.get(k) != new.get(k) and k not in ignore)
  if changed:
    shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
    raise UserError(
        f"workdir {workdir!r} holds a run with a different config (per "
        f"{source}, it differs in: {shown}); rerun with that run's settings, "
        "use a new --workdir, or pass --overwrite to delete that run and "
        "start over")


def write_config(config, workdir: str) -> None:
  """Writes the resolved config as workdir/config.json (atomically)."""
  makedirs(workdir)
  write_json(path(workdir, CONFIG_JSON),
             config_as_dict(config),
             indent=2,
             sort_keys=True)

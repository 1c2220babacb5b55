"""Orbax checkpoints of a training run in `<workdir>/checkpoints`.

Each checkpoint has two items: `state` (step, params, optimiser state) and
`meta` (JSON: the seed, the input pipeline's position, the resolved config).
Nothing else is needed to resume exactly: the data order, the augmentation
and the attack randomness (ARD/PRM masks included) are functions of the seed
and the step. Orbax writes each step into a temporary directory and renames
it when complete, so a half-written step is never taken for a good one;
an unreadable step is skipped with a warning in favour of the previous one.
"""

import json
import os
import re
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from vitat_jax.errors import UserError


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  if max_to_keep < 1:  # orbax would keep none (0) or fail (< 0)
    raise UserError(f"keep_checkpoints={max_to_keep} must be >= 1")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory(workdir), options=options,
                               item_names=("state", "meta"))


# What orbax leaves in `checkpoints/`: finished steps and unfinished ones.
_ORBAX_ENTRY = re.compile(r"^\d+(\.orbax-checkpoint-tmp.*)?$")


def check_is_a_run(workdir: str) -> None:
  """One-line error unless `checkpoints/` holds only orbax steps (no writes).

  `--overwrite` deletes the folder: it must be this program's.
  """
  path = directory(workdir)
  if not os.path.exists(path):
    return
  if not os.path.isdir(path):
    raise UserError(f"{path} is a file, not a checkpoints folder: move it "
                    "away or pass another --workdir")
  foreign = sorted(n for n in os.listdir(path) if not _ORBAX_ENTRY.match(n))
  if foreign:
    raise UserError(f"{path} holds {foreign[0]!r}, which is not a checkpoint "
                    "of a run: --overwrite deletes this folder, so move it "
                    "away or pass another --workdir")


def saved_steps(workdir: str):
  """The finished steps in `checkpoints/`, newest first (no writes)."""
  path = directory(workdir)
  if not os.path.isdir(path):
    return []
  return sorted((int(n) for n in os.listdir(path) if n.isdigit()),
                reverse=True)


def read_meta(workdir: str) -> Optional[dict]:
  """The `meta` item of the newest checkpoint where it is readable JSON."""
  for step in saved_steps(workdir):
    try:
      with open(os.path.join(directory(workdir), str(step), "meta",
                             "metadata")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict):
      return meta
  return None


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds any finished checkpoint (without creating it)."""
  path = directory(workdir)
  return os.path.isdir(path) and any(name.isdigit()
                                     for name in os.listdir(path))


def save(mngr: ocp.CheckpointManager, step: int, state,
         meta: Optional[Dict[str, Any]] = None) -> None:
  """Saves asynchronously; `mngr.wait_until_finished()` before relying on it."""
  meta = dict(meta or {}, step=int(step))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, *,
                   advice: str = "pass --overwrite to start the run over",
                   set_aside: bool = True
                   ) -> Tuple[Any, Optional[int], Optional[dict]]:
  """(state, step, meta) of the newest readable checkpoint, or Nones.

  `advice` ends the error when none can be read; `set_aside=False` (for
  evaluation, which must not change a run) leaves unreadable steps in place.

  Raises:
    UserError: checkpoints exist but none of them can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None, None, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  unreadable = []
  for step in steps:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint of step %d in %s cannot be read (%s: %s); "
                      "falling back to the previous one", step,
                      mngr.directory, type(e).__name__, str(e)[:200])
      unreadable.append(step)
      continue
    if set_aside:
      _set_aside(mngr, unreadable)
    logging.info("resuming from the checkpoint of step %d in %s", step,
                 mngr.directory)
    return restored.state, step, dict(restored.meta)
  raise UserError(f"none of the checkpoints in {mngr.directory} (steps "
                  f"{', '.join(map(str, steps))}) can be read; {advice}")


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  """Moves unreadable steps out of the way (kept for inspection, not reused)."""
  if not steps:
    return
  root = os.path.dirname(str(mngr.directory))
  aside = os.path.join(root, "unreadable_checkpoints")
  os.makedirs(aside, exist_ok=True)
  for step in steps:
    source = os.path.join(str(mngr.directory), str(step))
    target = os.path.join(aside, f"{step}-{int(time.time())}")
    shutil.move(source, target)
    logging.warning("moved the unreadable checkpoint of step %d to %s", step,
                    target)
  mngr.reload()


def delete_all(workdir: str) -> None:
  """Removes a workdir's checkpoints (an explicit start-over)."""
  shutil.rmtree(directory(workdir), ignore_errors=True)

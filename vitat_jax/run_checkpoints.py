"""Orbax checkpoints of a training run in `<workdir>/checkpoints`.

A checkpoint holds the train state (step, params, optimiser state). Nothing
else is needed to resume exactly: the data order, the augmentation and the
attack randomness (ARD/PRM masks included) are all functions of the seed and
the step.
"""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(path, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves asynchronously where orbax can; `wait` before reading it back."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, step) of the latest checkpoint, or (None, None) if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  logging.info("restored checkpoint of step %d from %s", step,
               mngr.directory)
  return state, step

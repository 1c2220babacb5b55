"""SIGTERM / SIGINT: finish the step, save, exit; a second signal exits at once.

Pods preempt jobs with SIGTERM and people press Ctrl-C. The training loop
polls `requested` after every step; when set it saves a checkpoint and raises
`Preempted`, which `main.py` turns into a message naming the step.
"""

import os
import signal
import sys
import threading

from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# A BaseException, like KeyboardInterrupt: raised by the signal handler
# wherever the signal lands, it must not be swallowed by an `except
# Exception` there (logging's emit() printed "--- Logging error ---" for a
# SIGTERM landing while a log line was written, and the run went on).
class Preempted(BaseException):
  """The run stopped on a signal after saving the checkpoint of `step`."""

  def __init__(self, step: int, signum: int, during: str = ""):
    self.step = step
    self.signum = signum
    name = signal.Signals(signum).name
    if during:
      super().__init__(f"stopped by {name} {during}; the checkpoint of step "
                       f"{step} is saved: rerun the same command to finish")
    else:
      super().__init__(f"stopped by {name} after step {step}; its checkpoint "
                       "is saved: rerun the same command to resume")

  @property
  def exit_code(self) -> int:
    # A clean, resumable stop: schedulers requeue on their own signal.
    return 0


class PreemptionGuard:
  """Context manager installing the two-stage signal handlers."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._stop_at_once = None

  def stop_at_once(self, step, during: str = ""):
    """From now on a signal raises `Preempted(step)` where it lands.

    For phases that need no saving because the checkpoint of `step` is
    already on disk (the final evaluation); `None` restores polling.
    """
    self._stop_at_once = None if step is None else (step, during)
    if step is not None and self.signum is not None:
      raise Preempted(step, self.signum, during)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      sys.stderr.write(f"second {signal.Signals(signum).name}: exiting now, "
                       "without saving\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    if self._stop_at_once is not None:
      raise Preempted(*self._stop_at_once[:1], signum, self._stop_at_once[1])
    logging.warning(
        "%s received: saving a checkpoint after this step, then "
        "stopping (send it again to exit at once)",
        signal.Signals(signum).name)

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    return False

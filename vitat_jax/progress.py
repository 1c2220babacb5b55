"""A progress bar per epoch: images/s, the epoch's ETA and the run's ETA.

    progress = Progress(total_steps, steps_per_epoch, batch_size,
                        start_step=start_step)
    for step in range(start_step, total_steps):
      ...
      progress.update(step + 1)        # steps done; no device sync
    progress.close()

The bar is drawn (with tqdm, on stderr) only when that stream is a
terminal, so logs captured by CI or `| tee` stay free of control
characters; `enabled=True/False` forces it on or off. Log lines printed
while a bar is open go through `with progress.hidden(): logging.info(...)`
so the bar is redrawn below them instead of being torn apart.
"""

import contextlib
import datetime
import io
import os
import sys
import time
from typing import Any, Mapping, Optional, TextIO

import tqdm


def is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def _columns(stream) -> int:
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
    return 0


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
  """One tqdm bar per epoch, counting images; a no-op when disabled.

  Args:
    total_steps: the run's last step.
    steps_per_epoch: steps in a full epoch (the last one may be partial).
    batch_size: global batch size, for images/s.
    start_step: steps already done (a resumed run).
    enabled: None = only when `stream` is a terminal.
    stream: where the bar goes (default sys.stderr).
  """

  def __init__(self,
               total_steps: int,
               steps_per_epoch: int,
               batch_size: int,
               *,
               start_step: int = 0,
               enabled: Optional[bool] = None,
               stream: Optional[TextIO] = None):
    self.total_steps = int(total_steps)
    self.steps_per_epoch = int(steps_per_epoch)
    self.batch_size = int(batch_size)
    self._stream = stream if stream is not None else sys.stderr
    self.enabled = is_terminal(self._stream) if enabled is None else enabled
    self.num_epochs = -(-self.total_steps // self.steps_per_epoch)
    self._step = int(start_step)
    self._bar = None
    self._metrics = ""
    # Follow the terminal's width; a pseudo-terminal reporting 0 columns
    # (`script`, some CI runners) would otherwise get empty lines.
    self._width = ({
        "dynamic_ncols": True
    } if _columns(self._stream) > 0 else {
        "ncols": 120,
        "nrows": 20
    })

  def _open(self, epoch: int):
    first = (epoch - 1) * self.steps_per_epoch
    steps = min(self.steps_per_epoch, self.total_steps - first)
    self._bar = tqdm.tqdm(total=steps * self.batch_size,
                          initial=(self._step - first) * self.batch_size,
                          desc=f"epoch {epoch}/{self.num_epochs}",
                          unit="img",
                          unit_scale=True,
                          file=self._stream,
                          leave=True,
                          smoothing=0.0,
                          mininterval=0.5,
                          **self._width)
    self._bar_initial = self._bar.n
    self._bar_start = time.monotonic()

  def update(self, step: int):
    """`step` steps are done (call after every step with a Python int)."""
    if not self.enabled or step <= self._step:
      return
    epoch = -(-step // self.steps_per_epoch)
    if self._bar is None:
      self._step = max(self._step, (epoch - 1) * self.steps_per_epoch)
      self._open(epoch)
    self._bar.update((step - self._step) * self.batch_size)
    self._step = step
    self._set_postfix()
    if step % self.steps_per_epoch == 0 or step >= self.total_steps:
      self._bar.close()  # before the epoch's evaluation starts
      self._bar = None

  def set_metrics(self, metrics: Mapping[str, Any]):
    """Shows e.g. {"loss": 1.2, "adv-acc": 0.41} next to the bar."""
    if not self.enabled:
      return
    self._metrics = "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items())
    self._set_postfix()

  def _set_postfix(self):
    if self._bar is None:
      return
    parts = [self._metrics] if self._metrics else []
    done = self._bar.n - self._bar_initial
    elapsed = time.monotonic() - self._bar_start
    if done > 0 and elapsed > 0:
      rate = done / elapsed  # images/s over this epoch so far
      remaining = (self.total_steps - self._step) * self.batch_size / rate
      parts.append(f"run ETA {_duration(remaining)}")
    self._bar.set_postfix_str("  ".join(parts), refresh=False)

  @contextlib.contextmanager
  def hidden(self):
    """Clears the bar while the body writes to the terminal, then redraws."""
    if self._bar is None:
      yield
    else:
      with tqdm.tqdm.external_write_mode(file=self._stream):
        yield

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

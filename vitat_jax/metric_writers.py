"""Metrics a person can read: JSON lines for scripts, TensorBoard for eyes.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_scalars(step, {"train_loss": 0.7, "train_accuracy": 0.4})
    writer.close()

Each `write_scalars` appends one record `{"step": step, **scalars}` to
`workdir/metrics.jsonl` and the numeric scalars to TensorBoard event files
under `workdir/tensorboard/` (tags `train/loss`, `test/pgd20_acc`, ...).
The event files are written with TensorBoard's own writer, which needs no
TensorFlow; without the `tensorboard` package only the JSON lines are kept.
`read_jsonl` and `read_tensorboard_scalars` read both back.
"""

import atexit
import json
import numbers
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Keys with these prefixes become TensorBoard sections (train_loss ->
# train/loss).
_SECTIONS = ("train_", "test_", "final_")


def _plain(value: Any) -> Any:
  """Python int/float/str/bool for numpy and JAX scalars; others unchanged."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, "item") and getattr(value, "size", None) == 1:
    return _plain(value.item())  # 0-d numpy / jax arrays
  return value


def tensorboard_tag(key: str) -> str:
  for prefix in _SECTIONS:
    if key.startswith(prefix):
      return prefix[:-1] + "/" + key[len(prefix):]
  return key


_EVENT_FILE_SECOND = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _wait_past_existing_event_files(logdir: str) -> None:
  """Waits (under a second) until a new event file sorts after the old ones.

  TensorBoard reads event files in name order and a purge applies only to
  earlier files. Names start with the creation second, then end in an
  unpadded per-process counter, so two files of one process in the same
  second can sort backwards ("...10" < "...9") and the purge misfire.
  """
  if not os.path.isdir(logdir):
    return
  seconds = [int(m.group(1)) for m in map(_EVENT_FILE_SECOND.match,
                                          os.listdir(logdir)) if m]
  if seconds:
    while time.time() < max(seconds) + 1:
      time.sleep(0.01)


class _TensorBoardWriter:
  """Scalars and text as TensorBoard events (simple values, no TensorFlow)."""

  def __init__(self, logdir: str, purge_step: Optional[int]):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer import event_file_writer
    self._event_pb2 = event_pb2
    self._summary_pb2 = summary_pb2
    _wait_past_existing_event_files(logdir)
    self._writer = event_file_writer.EventFileWriter(logdir, flush_secs=30)
    if purge_step is not None:
      # TensorBoard drops events at steps >= purge_step from earlier files,
      # so a resumed run does not draw the lost steps twice.
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))

  def _add(self, step: int, values):
    summary = self._summary_pb2.Summary(value=values)
    self._writer.add_event(self._event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary))

  def scalars(self, step: int, scalars: Mapping[str, float]):
    value = self._summary_pb2.Summary.Value
    self._add(step, [value(tag=tensorboard_tag(k), simple_value=v)
                     for k, v in scalars.items()])

  def text(self, step: int, texts: Mapping[str, str]):
    from tensorboard.compat.proto import tensor_pb2
    from tensorboard.compat.proto import tensor_shape_pb2
    from tensorboard.compat.proto import types_pb2
    pb = self._summary_pb2
    metadata = pb.SummaryMetadata(
        plugin_data=pb.SummaryMetadata.PluginData(plugin_name="text"))
    values = []
    for tag, text in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
          tensor_shape=tensor_shape_pb2.TensorShapeProto(
              dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
      values.append(pb.Summary.Value(tag=tag, metadata=metadata,
                                     tensor=tensor))
    self._add(step, values)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard.

  Args:
    workdir: the run's directory (created if missing).
    enabled: False makes every method a no-op (processes other than 0).
    tensorboard: False keeps only the JSON lines.
    purge_step: on resumption, the first step the resumed run will write;
      TensorBoard then hides what an interrupted run wrote from there on.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               tensorboard: bool = True, purge_step: Optional[int] = None):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, JSONL_NAME)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self.jsonl_path, "a")
    # TensorBoard's writer thread is a daemon: without a close, an exception
    # leaving the training loop would drop the events still queued.
    atexit.register(self.close)
    if tensorboard:
      try:
        self._tb = _TensorBoardWriter(self.tensorboard_dir, purge_step)
      except ImportError:
        logging.warning("the tensorboard package is not installed: metrics "
                        "go to %s only (pip install tensorboard)",
                        self.jsonl_path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Appends `{"step": step, **scalars}`; numbers also go to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update((k, _plain(v)) for k, v in scalars.items())
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()  # a crash loses at most the record being written
    if self._tb is not None:
      numeric = {k: float(v) for k, v in record.items()
                 if k != "step" and isinstance(v, numbers.Real)}
      if numeric:
        self._tb.scalars(step, numeric)

  def write_text(self, step: int, texts: Mapping[str, str]):
    """Text (markdown) for TensorBoard's text tab, e.g. the config."""
    if self.enabled and self._tb is not None:
      self._tb.text(step, texts)

  def flush(self):
    if not self.enabled:
      return
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if not self.enabled or self._jsonl is None:
      return
    atexit.unregister(self.close)
    self._jsonl.close()
    self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_jsonl(workdir: str) -> List[Dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, as one uninterrupted run.

  A run resumed from a checkpoint writes again the steps that the
  interrupted run wrote after that checkpoint, a finished run evaluated
  again its final record; the later records win. A missing file reads as
  no records; an unreadable (half-written) line is skipped.
  """
  path = os.path.join(workdir, JSONL_NAME)
  if not os.path.exists(path):
    return []
  records: List[Dict[str, Any]] = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(record, dict) or "step" not in record:
        continue
      # Where a resumed (or re-evaluated) run starts writing again, the
      # records from there on are replaced: from the first one at a later
      # step, or from an earlier copy of this record (same step and keys).
      step = record["step"]
      if records and step < records[-1]["step"]:
        cut = next(i for i, r in enumerate(records) if r["step"] >= step)
      else:
        cut = next((i for i, r in enumerate(records) if r["step"] == step
                    and r.keys() == record.keys()), len(records))
      records = records[:cut] + [record]
  return records


def read_tensorboard_scalars(
    workdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files of `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(
      os.path.join(workdir, TENSORBOARD_DIR),
      size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


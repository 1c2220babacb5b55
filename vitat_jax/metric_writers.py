"""Metrics a person can read: JSON lines for scripts, TensorBoard for eyes.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_scalars(step, {"train_loss": 0.7, "train_accuracy": 0.4})
    writer.close()

Each `write_scalars` appends one record `{"step": step, **scalars}` to
`workdir/metrics.jsonl` and the numeric scalars to TensorBoard event files
under `workdir/tensorboard/` (tags `train/loss`, `test/pgd20_acc`, ...).
The event files are written with TensorBoard's own writer, which needs no
TensorFlow; without the `tensorboard` package only the JSON lines are kept.
`runs.read_jsonl` and `read_tensorboard_scalars` read them back.

On cloud storage (`gs://...`), where an object cannot be appended to, the
JSON lines are rewritten whole at each record and the TensorBoard events are
written to a local file that is uploaded whole at each flush (at most every
30 s, at epoch ends and at the end): TensorBoard's own writer would replace
the object with its last buffer each time.

A resumed run passes `purge_step` (the first step it will write again):
records at that step and later are dropped from `metrics.jsonl` and hidden
in TensorBoard, so both show one uninterrupted run.
"""

import atexit
import json
import numbers
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath

from vitat_jax import workdir as workdir_lib

# Keys with these prefixes become TensorBoard sections (train_loss ->
# train/loss).
_SECTIONS = ("train_", "test_", "final_")


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
  folder = epath.Path(logdir)
  if not folder.is_dir():
    return
  seconds = [
      int(m.group(1))
      for m in map(_EVENT_FILE_SECOND.match, (p.name for p in folder.iterdir()))
      if m
  ]
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
    # A cloud logdir: events go to a local folder, uploaded whole.
    self._upload_to = None if workdir_lib.is_local(logdir) else logdir
    self._uploaded = time.monotonic()
    local = tempfile.mkdtemp(prefix="tb.") if self._upload_to else logdir
    self._writer = event_file_writer.EventFileWriter(local, flush_secs=30)
    if purge_step is not None:
      # TensorBoard drops events at steps >= purge_step from earlier files,
      # so a resumed run does not draw the lost steps twice.
      self._writer.add_event(
          event_pb2.Event(wall_time=time.time(),
                          step=purge_step,
                          session_log=event_pb2.SessionLog(
                              status=event_pb2.SessionLog.START)))

  def _add(self, step: int, values):
    summary = self._summary_pb2.Summary(value=values)
    self._writer.add_event(
        self._event_pb2.Event(wall_time=time.time(),
                              step=int(step),
                              summary=summary))
    if self._upload_to and time.monotonic() - self._uploaded > 30:
      self.flush()

  def _upload(self):
    """Copies the local event file over its cloud copy (one whole object)."""
    self._uploaded = time.monotonic()
    local = self._writer.get_logdir()
    target = epath.Path(self._upload_to)
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(local):
      (target / name).write_bytes(
          epath.Path(os.path.join(local, name)).read_bytes())

  def scalars(self, step: int, scalars: Mapping[str, float]):
    value = self._summary_pb2.Summary.Value
    self._add(step, [
        value(tag=tensorboard_tag(k), simple_value=v)
        for k, v in scalars.items()
    ])

  def text(self, step: int, texts: Mapping[str, str]):
    from tensorboard.compat.proto import tensor_pb2
    from tensorboard.compat.proto import tensor_shape_pb2
    from tensorboard.compat.proto import types_pb2
    pb = self._summary_pb2
    metadata = pb.SummaryMetadata(plugin_data=pb.SummaryMetadata.PluginData(
        plugin_name="text"))
    values = []
    for tag, text in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING,
          string_val=[text.encode("utf-8")],
          tensor_shape=tensor_shape_pb2.TensorShapeProto(
              dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
      values.append(pb.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))
    self._add(step, values)

  def flush(self):
    self._writer.flush()
    if self._upload_to:
      self._upload()

  def close(self):
    self._writer.close()
    if self._upload_to:
      self._upload()
      shutil.rmtree(self._writer.get_logdir(), ignore_errors=True)


class _JsonLines:
  """An appendable text file; on an object store, rewritten whole."""

  def __init__(self, path: str, kept: str):
    self._path = path
    self._local = workdir_lib.is_local(path)
    if self._local:
      self._file = open(path, "a")
    else:
      self._text = kept

  def write(self, line: str):
    if self._local:
      self._file.write(line)
      self._file.flush()  # a crash loses at most the record being written
    else:
      self._text += line
      epath.Path(self._path).write_text(self._text)

  def flush(self):
    if self._local:
      self._file.flush()

  def close(self):
    if self._local:
      self._file.close()


def _purge_jsonl(path: str, purge_step: Optional[int]) -> str:
  """Keeps the records of steps before `purge_step` (all if None),
  atomically; returns the text kept.

  A line that does not parse (the half-written tail a SIGKILL or a full disk
  leaves) is dropped too.
  """
  if not epath.Path(path).exists():
    return ""
  kept = []
  for line in epath.Path(path).read_text().splitlines(keepends=True):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and (purge_step is None or
                                     record.get("step", 0) < purge_step):
      kept.append(line if line.endswith("\n") else line + "\n")
  text = "".join(kept)
  if purge_step is not None:
    workdir_lib.write_text(path, text)
  return text


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard.

  Args:
    workdir: the run's directory (created if missing).
    enabled: False makes every method a no-op (processes other than 0).
    tensorboard: False keeps only the JSON lines.
    purge_step: on resumption, the first step the resumed run will write:
      what an interrupted run wrote from there on is dropped from the JSON
      lines and hidden in TensorBoard.
  """

  def __init__(self,
               workdir: str,
               *,
               enabled: bool = True,
               tensorboard: bool = True,
               purge_step: Optional[int] = None):
    self.enabled = enabled
    self.jsonl_path = workdir_lib.path(workdir, workdir_lib.METRICS_JSONL)
    self.tensorboard_dir = workdir_lib.path(workdir,
                                            workdir_lib.TENSORBOARD_DIR)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    workdir_lib.makedirs(workdir)
    kept = _purge_jsonl(self.jsonl_path, purge_step)
    self._jsonl = _JsonLines(self.jsonl_path, kept)
    # TensorBoard's writer thread is a daemon: without a close, an exception
    # leaving the training loop would drop the events still queued.
    atexit.register(self.close)
    if tensorboard:
      try:
        self._tb = _TensorBoardWriter(self.tensorboard_dir, purge_step)
      except ImportError:
        logging.warning(
            "the tensorboard package is not installed: metrics "
            "go to %s only (pip install tensorboard)", self.jsonl_path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Appends `{"step": step, **scalars}`; numbers also go to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update(workdir_lib.jsonable(dict(scalars)))
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      numeric = {
          k: float(v)
          for k, v in record.items()
          if k != "step" and isinstance(v, numbers.Real)
      }
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


def read_tensorboard_scalars(
    workdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files of `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(
      workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR),
      size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {
      tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
      for tag in accumulator.Tags()["scalars"]
  }

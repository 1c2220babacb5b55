"""MetricWriter: JSON lines and TensorBoard events, read back."""

import json
import math
import os
import time

import numpy as np

from vitat_jax import metric_writers
from vitat_jax import runs


def _write_run(workdir, steps=(10, 20, 30)):
  with metric_writers.MetricWriter(workdir) as writer:
    for step in steps:
      writer.write_scalars(
          step, {
              "epoch": step / 10,
              "train_loss": np.float32(2.0 / step),
              "train_accuracy": np.asarray(step / 100),
              "train_lr": 0.1
          })
    writer.write_scalars(
        steps[-1], {
            "epoch": 3,
            "test_clean_acc": 0.5,
            "test_pgd20_acc": 0.25,
            "test_num_eval_images": np.int64(500)
        })
    writer.write_text(0, {"config": "```\nlr: 0.1\n```"})


def test_jsonl_has_one_finite_record_per_write(tmp_path):
  _write_run(str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == [10, 20, 30, 30]
  assert lines[0].keys() == {
      "step", "epoch", "train_loss", "train_accuracy", "train_lr"
  }
  for record in lines:
    assert all(math.isfinite(v) for v in record.values())
  assert lines[-1]["test_num_eval_images"] == 500
  assert isinstance(lines[-1]["test_num_eval_images"], int)
  assert runs.read_jsonl(str(tmp_path)) == lines


def test_tensorboard_events_hold_the_scalars(tmp_path):
  _write_run(str(tmp_path))
  event_files = os.listdir(tmp_path / "tensorboard")
  assert event_files and all(
      f.startswith("events.out.tfevents") for f in event_files)
  scalars = metric_writers.read_tensorboard_scalars(str(tmp_path))
  assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [0.2, 0.1, 2 / 30],
                             rtol=1e-6)
  assert scalars["test/pgd20_acc"] == [(30, 0.25)]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path / "run"), enabled=False)
  writer.write_scalars(1, {"train_loss": 1.0})
  writer.write_text(1, {"note": "x"})
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()
  assert runs.read_jsonl(str(tmp_path / "run")) == []


def test_resumed_run_replaces_the_lost_steps(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir)  # interrupted after step 30, checkpoint at step 20
  with metric_writers.MetricWriter(workdir, purge_step=21) as writer:
    writer.write_scalars(30, {
        "epoch": 3.0,
        "train_loss": 9.0,
        "train_accuracy": 0.0,
        "train_lr": 0.1
    })
  records = runs.read_jsonl(workdir)
  assert [r["step"] for r in records] == [10, 20, 30]
  np.testing.assert_allclose([r["train_loss"] for r in records],
                             [0.2, 0.1, 9.0],
                             rtol=1e-6)
  scalars = metric_writers.read_tensorboard_scalars(workdir)
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [0.2, 0.1, 9.0],
                             rtol=1e-6)
  assert scalars["test/pgd20_acc"] == []


def test_purge_holds_when_the_old_event_file_name_sorts_late(tmp_path):
  # The earlier file's name sorts after one the resumed run would open now:
  # a counter ("99999") that sorts after short ones, stamped with the next
  # second (a file of the same second, at worst). TensorBoard reads files in
  # name order and purges only earlier ones, so the new file must sort last.
  workdir = str(tmp_path)
  _write_run(workdir)
  logdir = tmp_path / "tensorboard"
  (old,) = os.listdir(logdir)
  parts = old.split(".")
  parts[3] = "%010d" % (int(time.time()) + 1)
  renamed = ".".join(parts[:-1] + ["99999"])
  os.rename(logdir / old, logdir / renamed)
  with metric_writers.MetricWriter(workdir, purge_step=21) as writer:
    writer.write_scalars(30, {"train_loss": 9.0})
  assert sorted(os.listdir(logdir))[-1] != renamed
  scalars = metric_writers.read_tensorboard_scalars(workdir)
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [0.2, 0.1, 9.0],
                             rtol=1e-6)


def test_a_repeated_final_record_replaces_only_itself(tmp_path):
  _write_run(str(tmp_path))
  for accuracy in (0.5, 0.6):  # a finished run evaluated twice
    with metric_writers.MetricWriter(str(tmp_path),
                                     tensorboard=False) as writer:
      writer.write_scalars(30, {"final_clean_acc": accuracy})
  records = runs.read_jsonl(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20, 30, 30, 30]
  assert records[-1] == {"step": 30, "final_clean_acc": 0.6}


def test_half_written_last_line_is_skipped(tmp_path):
  _write_run(str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "train_lo')
  assert len(runs.read_jsonl(str(tmp_path))) == 4

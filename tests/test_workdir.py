"""The workdir module: the one owner of a run's files, their writes and lock."""

import json
import os

import pytest

from tests import _tiny
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError


def test_json_is_written_atomically_and_read_back(tmp_path):
  path = workdir_lib.path(str(tmp_path), workdir_lib.METRICS_JSON)
  workdir_lib.write_json(path, {"clean_acc": 0.5, "nan": float("nan")})
  assert workdir_lib.read_json(path)["clean_acc"] == 0.5
  # Nothing but the file itself is left behind (no temporary files).
  assert os.listdir(tmp_path) == [workdir_lib.METRICS_JSON]
  workdir_lib.write_text(path, "not json")
  assert workdir_lib.read_json(path) is None  # unreadable, not an exception


def test_jsonable_turns_numpy_and_tuples_into_plain_json():
  import numpy as np  # pylint: disable=g-import-not-at-top
  value = workdir_lib.jsonable({
      "a": np.float32(0.5),
      "b": (1, 2),
      "c": np.arange(2)
  })
  assert json.loads(json.dumps(value)) == {"a": 0.5, "b": [1, 2], "c": [0, 1]}


def test_a_workdir_that_is_a_file_is_refused_in_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(UserError) as error:
    workdir_lib.check_writable(str(a_file))
  assert "\n" not in str(error.value)


def test_only_a_run_s_checkpoints_may_be_started_over(tmp_path):
  checkpoints = tmp_path / workdir_lib.CHECKPOINTS_DIR
  (checkpoints / "7").mkdir(parents=True)
  workdir_lib.check_is_a_run(str(tmp_path))  # orbax steps only: a run
  (checkpoints / "thesis.tex").write_text("years of work")
  with pytest.raises(UserError) as error:
    workdir_lib.check_is_a_run(str(tmp_path))
  assert "'thesis.tex'" in str(error.value)
  assert (checkpoints / "thesis.tex").exists()


def test_the_lock_refuses_a_second_holder(tmp_path):
  workdir = str(tmp_path)
  with workdir_lib.lock(workdir):
    assert workdir_lib.is_locked(workdir)
    with pytest.raises(UserError) as error:
      workdir_lib.check_unlocked(workdir)
    assert "in use by a running training" in str(error.value)
  assert not workdir_lib.is_locked(workdir)


def test_another_config_in_the_same_workdir_is_refused(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.write_config(_tiny.config(), workdir)
  workdir_lib.check_same_config(_tiny.config(), workdir)  # the same: fine
  # What only changes the evaluation or the logging may differ.
  workdir_lib.check_same_config(_tiny.config(**{"eval.num_examples": 32}),
                                workdir)
  with pytest.raises(UserError) as error:
    workdir_lib.check_same_config(_tiny.config(**{"optim.lr": 0.5}), workdir)
  assert "differs in: optim.lr" in str(error.value)

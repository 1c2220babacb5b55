"""The one prologue: train, eval and export walk the same steps, in order."""

import pytest

from tests import _tiny
from vitat_jax import compilation
from vitat_jax import data as data_lib
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import setup
from vitat_jax import state as state_lib
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

# The setup steps, by the function that does each.
_STEPS = ((validate, "check_config"), (workdir_lib, "check_writable"),
          (compilation, "enable_cache"), (parallel, "make_mesh"),
          (workdir_lib, "check_same_config"), (data_lib, "load"),
          (state_lib, "build_model"), (optim, "make_optimizer"))


def _walk(monkeypatch, purpose, workdir, config):
  """The setup steps `prepare` takes for `purpose`, in order."""
  walked = []
  for module, name in _STEPS:
    real = getattr(module, name)

    def spy(*args, _real=real, _name=name, **kwargs):
      walked.append(_name)
      return _real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
  if purpose != "train":  # a run's checkpoints, found without reading them
    monkeypatch.setattr(workdir_lib, "has_checkpoints", lambda w: True)
  run = setup.prepare(config, workdir, purpose)
  monkeypatch.undo()
  return walked, run


def _is_subsequence(short, long):
  it = iter(long)
  return all(step in it for step in short)


def test_eval_and_export_walk_training_s_steps_in_its_order(
    monkeypatch, tmp_path):
  config = _tiny.config()
  train_walk, run = _walk(monkeypatch, "train", str(tmp_path / "t"), config)
  assert train_walk == [name for _, name in _STEPS]
  assert run.steps_per_epoch == 10 and run.total_steps == 20
  assert run.model.img_size == 8 and run.splits.num_classes == 10
  for purpose in ("eval", "export"):
    walked, other = _walk(monkeypatch, purpose, str(tmp_path / purpose), config)
    assert _is_subsequence(walked, train_walk), (purpose, walked)
    # The same run, built the same way; evaluation and export read no
    # train split (their steps per epoch are the checkpoint's; none here).
    assert other.splits.train is None and other.steps_per_epoch == 1
    assert other.model == run.model
  # Evaluation writes nothing but its results: the workdir is not required
  # to be writable.
  assert "check_writable" not in _walk(monkeypatch, "eval",
                                       str(tmp_path / "e2"), config)[0]


def test_the_setup_is_frozen_and_shards_batches(tmp_path):
  run = setup.prepare(_tiny.config(), str(tmp_path), "train")
  with pytest.raises(AttributeError):
    run.total_steps = 3  # frozen: the loop's state is the loop's
  images, labels = run.splits.train.get_batch(list(range(32)))
  placed = run.shard((images, labels))
  assert placed[0].shape == images.shape


@pytest.mark.parametrize("purpose, overrides, message", [
    ("eval", {}, "no checkpoint in"),
    ("export", {}, "no checkpoint in"),
    ("export", {
        "init.checkpoint": __file__
    }, "--mode=export exports a run's own checkpoint"),
    ("train", {
        "epochs": 0.01,
        "tricks.warmup_epochs": 0.0
    }, "round to 0 training steps"),
])
def test_prepare_refuses_in_one_line(purpose, overrides, message, tmp_path):
  with pytest.raises(UserError) as error:
    setup.prepare(_tiny.config(**overrides), str(tmp_path), purpose)
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not list(tmp_path.iterdir())  # nothing written


def test_an_unknown_purpose_is_a_programming_error(tmp_path):
  with pytest.raises(ValueError):
    setup.prepare(_tiny.config(), str(tmp_path), "serve")

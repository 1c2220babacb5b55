"""Objectives and evaluation attacks registered by name from a script."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _tiny
from vitat_jax import attack_names
from vitat_jax import evaluation
from vitat_jax import objectives
from vitat_jax import validate
from vitat_jax.errors import UserError


@pytest.fixture(autouse=True)
def _clean_registries(monkeypatch):
  monkeypatch.setattr(objectives, "_FACTORIES", dict(objectives._FACTORIES))
  monkeypatch.setattr(attack_names, "_REGISTERED", {})


def test_the_built_ins_are_entries_of_the_objective_registry():
  assert objectives.methods() == objectives.METHODS
  objective = objectives.make_objective(_tiny.config(method="trades"),
                                        _tiny.model())
  assert objective.func is objectives.trades_loss
  assert objective.keywords["beta"] == 6.0


def test_a_registered_objective_is_built_and_checked_by_name():
  factory = lambda config, model: functools.partial(objectives.natural_loss,
                                                    model=model)
  objectives.register("plain", factory)
  config = _tiny.config(method="plain")
  validate.check_config(config)
  assert objectives.make_objective(
      config, _tiny.model()).func is (objectives.natural_loss)
  with pytest.raises(UserError,
                     match=r"use one of at, trades, mart, "
                     r"natural, plain \(or register"):
    validate.check_config(_tiny.config(method="plian"))
  # Evaluation builds no objective: a run's unregistered method is fine.
  validate.check_config(_tiny.config(method="plian"), training=False)


@pytest.mark.parametrize("name", ["at", "Mine", "my-at", "", None])
def test_bad_or_built_in_objective_names_are_refused(name):
  with pytest.raises(UserError):
    objectives.register(name, lambda config, model: None)


@pytest.mark.parametrize("name", ["clean", "pgd20", "cw7", "aa", "pgd0", "A"])
def test_bad_or_built_in_attack_names_are_refused(name):
  with pytest.raises(UserError):
    attack_names.register_attack(name, lambda *a, **k: None)


def test_a_registered_attack_is_named_listed_and_projected():
  sentinel = {}

  def push(logits_fn, key, x, y, *, eps, alpha):
    sentinel["eps"], sentinel["alpha"] = eps, alpha
    del logits_fn, y
    return x + 1.0 + jax.random.uniform(key, x.shape)  # far out of the ball

  evaluation.register_attack("push", push)
  spec = attack_names.parse_attack("push")
  assert (spec.kind, attack_names.attack_label("push")) == ("registered",
                                                            "push")
  with pytest.raises(UserError, match=r"'cw<steps>' \(cw20\), 'push' or"):
    attack_names.parse_attack("puhs")
  validate.check_config(_tiny.config(**{"eval.attacks": ("clean", "push")}))
  # The attacked images are what the model sees: logits = their mean.
  model = _Probe()
  correct = evaluation.make_attack_fn(model, spec, eps=0.25, alpha=0.1)
  images = jnp.full((2, 8, 8, 3), 0.5)
  correct(None, jax.random.key(0), images, jnp.array([0, 0]))
  assert sentinel == {"eps": 0.25, "alpha": 0.1}
  np.testing.assert_allclose(model.seen[-1], 0.75)  # 0.5 + eps, in the box


class _Probe:
  """A stand-in model that records the mean pixel it is applied to."""

  def __init__(self):
    self.seen = []

  def apply(self, variables, x):
    del variables
    jax.debug.callback(lambda m: self.seen.append(float(m)), x.mean())
    return jnp.stack([x.mean(axis=(1, 2, 3)), -x.mean(axis=(1, 2, 3))], -1)

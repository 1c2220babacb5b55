"""The modern recipes' techniques: the params' exponential moving average
(the update, its warm-up, the evaluated weights; kill-and-resume with EMA is
test_resilience's) and the epsilon warm-up, sharing one compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _tiny
from vitat_jax import masks
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import state as state_lib
from vitat_jax import train_step
from vitat_jax import validate
from vitat_jax.errors import UserError

MODEL = _tiny.model()
STEPS = 4

EPS_WARMUP = {
    "attack.eps_warmup_epochs": 0.2,  # 2 steps of the 10 an epoch has
    "attack.eps_warmup_floor": 0.25,
    "attack.steps": 1
}


def _trajectory(**ema):
  """The raw params after each of STEPS steps, the final state, the EMA
  decays and the training attack's eps per step (PGD-1 with the epsilon
  warm-up)."""
  config = _tiny.config(**{f"ema.{k}": v for k, v in ema.items()}, **EPS_WARMUP)
  config.mixup.prob = 0.0
  objective = objectives.make_objective(config, MODEL)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs, 10)
  step = jax.jit(
      train_step.make_train_step(config, MODEL, objective, tx, schedule, 10,
                                 10))
  state = state_lib.initial_state(config, MODEL, tx, jax.random.key(0))
  images = np.random.RandomState(0).randint(0, 256, (8, 8, 8, 3), np.uint8)
  labels = (np.arange(8) % 10).astype(np.int32)
  raw = [state.params]
  decays, eps = [], []
  for _ in range(STEPS):
    state, metrics = step(state, images, labels, jax.random.key(1))
    raw.append(state.params)
    decays.append(float(metrics.get("ema_decay", np.nan)))
    eps.append(float(metrics["eps"]))
  return raw, state, decays, eps


def _closed_form(raw, decays):
  """e_0 = p_0, e_t = d_t e_{t-1} + (1 - d_t) p_t, unrolled: each p_k
  weighted by (1 - d_k) * prod_{j > k} d_j, p_0 by prod d_j."""
  weights = [np.prod(decays)]
  for k in range(1, len(raw)):
    weights.append((1 - decays[k - 1]) * np.prod(decays[k:]))
  assert np.isclose(sum(weights), 1.0)
  return jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *raw)


def test_the_ema_of_training_steps_equals_its_closed_form():
  # One compiled step, with the decay's warm-up: 0.1, 0.18, 0.25, 0.31.
  raw, state, decays, eps = _trajectory(decay=0.9, warmup=True)
  # The epsilon warm-up: from a quarter of eps, linear over 2 steps.
  np.testing.assert_allclose(eps,
                             np.array([0.25, 0.625, 1.0, 1.0]) * 8 / 255,
                             rtol=1e-6)
  expected = [min(0.9, (1 + t) / (10 + t)) for t in range(STEPS)]
  np.testing.assert_allclose(decays, expected, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state.ema_params, _closed_form(raw, decays))
  # The raw params are the optimiser's, untouched by the averaging.
  jax.tree.map(np.testing.assert_array_equal, state.params, raw[-1])


def test_the_decay_is_constant_without_warmup_and_capped_with_it():
  config = _tiny.config(**{"ema.decay": 0.9})
  assert [float(state_lib.ema_decay(config, t)) for t in (0, 100)
         ] == pytest.approx([0.9, 0.9])
  config.ema.warmup = True
  assert [float(state_lib.ema_decay(config, t)) for t in (0, 8, 1000)
         ] == pytest.approx([0.1, 0.5, 0.9])
  ema = state_lib.update_ema({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0.75)
  np.testing.assert_allclose(ema["w"], [0.75, 0.75])


def test_without_ema_the_state_is_the_one_before_ema_existed():
  config = _tiny.config()
  tx, _ = optim.make_optimizer(config.optim, 2.0, 10)
  assert state_lib.initial_state(config, MODEL, tx,
                                 jax.random.key(0)).ema_params is None
  tx, _ = optim.make_optimizer(_tiny.config().optim, 2.0, 10)
  plain = state_lib.abstract_state(MODEL, tx, 0)
  averaged = state_lib.abstract_state(MODEL, tx, 0, ema=True)
  assert (len(jax.tree.leaves(averaged)) == len(jax.tree.leaves(plain)) +
          len(jax.tree.leaves(plain.params)))


@pytest.mark.parametrize("overrides, weights", [
    ({}, "raw"),
    ({
        "ema.decay": 0.99
    }, "ema"),
    ({
        "ema.decay": 0.99,
        "eval.weights": "raw"
    }, "raw"),
])
def test_the_evaluated_weights(overrides, weights):
  config = _tiny.config(**overrides)
  validate.check_config(config)
  assert state_lib.evaluated_weights(config) == weights
  state = state_lib.TrainState(jnp.zeros((), jnp.int32), "raw", None,
                               "ema" if config.ema.decay else None)
  assert state_lib.evaluated_params(config, state) == weights


@pytest.mark.parametrize("overrides, fragment", [
    ({
        "ema.decay": 1.0
    }, "ema.decay=1.0"),
    ({
        "ema.decay": -0.1
    }, "ema.decay=-0.1"),
    ({
        "eval.weights": "ema"
    }, "keeps no EMA params"),
    ({
        "eval.weights": "best"
    }, "eval.weights='best'"),
])
def test_bad_ema_settings_are_one_line_errors(overrides, fragment):
  with pytest.raises(UserError) as error:
    validate.check_config(_tiny.config(**overrides))
  assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_epsilon_warm_up_scales_the_training_attack():
  assert masks.eps_scale(0, 10, 0.0) == 1.0  # off: the attack unchanged
  assert float(masks.eps_scale(5, 10, 1.0)) == pytest.approx(0.5)
  assert float(masks.eps_scale(5, 10, 1.0, floor=0.5)) == pytest.approx(0.75)
  config = _tiny.config()
  objective = objectives.make_objective(config, MODEL)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  images = jax.random.uniform(jax.random.key(2), (8, 8, 8, 3))
  batch = {"image": images, "target": jax.nn.one_hot(jnp.arange(8) % 10, 10)}
  key = jax.random.key(3)
  # At eps 0 the attack cannot move: PGD-AT's loss is the clean loss.
  at_zero = objective(params, batch, key, 1.0, 0.0)[0]
  clean = objectives.soft_cross_entropy(MODEL.apply({"params": params}, images),
                                        batch["target"]).mean()
  np.testing.assert_allclose(at_zero, clean, rtol=1e-6)
  assert objective(params, batch, key, 1.0, 1.0)[0] > clean

"""Recipe plumbing: gradient accumulation, RandAugment in the step, and the
one-line config errors of the paper's recipe options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tests import _tiny
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import state as state_lib
from vitat_jax import train_step
from vitat_jax import validate
from vitat_jax.errors import UserError

MODEL = _tiny.model()
IMAGES = np.random.RandomState(0).randint(0, 256, (8, 8, 8, 3)).astype(np.uint8)
LABELS = (np.arange(8) % 10).astype(np.int32)


def _config(**overrides):
  config = default.get_config()
  config.data.name = "digits"
  _tiny.shrink(config)
  config.method = "natural"
  config.batch_size = 8
  config.augment.crop_padding = 0
  config.augment.flip = False
  config.mixup.prob = 0.0
  config.update_from_flattened_dict(overrides)
  return config


def _one_step(config):
  objective = objectives.make_objective(config, MODEL)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs, 10)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  step = jax.jit(
      train_step.make_train_step(config, MODEL, objective, tx, schedule, 10,
                                 10))
  state = state_lib.TrainState(jnp.asarray(0, jnp.int32), params,
                               tx.init(params))
  key = jax.random.key(1)
  # Without XLA's backend optimisations: half the compile time of one step.
  compiled = step.lower(state, IMAGES, LABELS,
                        key).compile({"xla_backend_optimization_level": 0})
  return compiled(state, IMAGES, LABELS, key)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_accumulated_step_equals_the_full_batch_step(grad_clip):
  # Natural training with no dropout is deterministic given the params, so
  # two micro-batches of 4 must give the 8-example update.
  full, full_metrics = _one_step(_config(**{"optim.grad_clip": grad_clip}))
  accum, accum_metrics = _one_step(
      _config(accum_steps=2, **{"optim.grad_clip": grad_clip}))
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(full_metrics["loss"],
                             accum_metrics["loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(full_metrics["grad_norm"],
                             accum_metrics["grad_norm"],
                             rtol=1e-5)


def test_adversarial_step_with_accumulation_and_randaugment_runs():
  state, metrics = _one_step(
      _config(method="trades",
              accum_steps=4,
              **{
                  "tricks.ard": True,
                  "tricks.prm": True,
                  "tricks.warmup_epochs": 1.0,
                  "attack.steps": 2,
                  "augment.randaugment": "rand-m9-n2"
              }))
  assert int(state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("overrides,message", [
    (dict(method="pgd"), "unknown method 'pgd'"),
    (dict(beta=-1.0), "beta=-1.0 must be a finite number >= 0"),
    (dict(accum_steps=3), "accum_steps=3 must be a positive integer dividing "
     "batch_size=8"),
    (dict(accum_steps=0), "accum_steps=0"),
    ({
        "augment.randaugment": "rand-z9"
    }, "unknown RandAugment spec"),
    ({
        "optim.name": "lamb"
    }, "unknown optimizer 'lamb'"),
    ({
        "optim.schedule": "step"
    }, "unknown lr schedule 'step'"),
    ({
        "tricks.ard": True,
        "tricks.warmup_epochs": 50.0
    }, "warmup_epochs=50.0 must be in"),
])
def test_recipe_options_fail_with_one_line_errors(overrides, message):
  with pytest.raises(UserError) as error:
    validate.check_config(_config(**overrides))
  assert message in str(error.value)
  assert "\n" not in str(error.value)

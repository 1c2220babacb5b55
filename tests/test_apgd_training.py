"""APGD as the training attack (`attack.name="apgd"`): the evaluation's
APGD-CE iteration, PRM and ARD on it, the epsilon warm-up, and a short run.

One tiny model; the attack is compiled once per (ARD, PRM) switch."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from tests import _tiny
from vitat_jax import attacks
from vitat_jax import objectives
from vitat_jax import train
from vitat_jax.attacks.apgd import keyed
from vitat_jax.attacks.apgd import single_run

MODEL = _tiny.model()
X = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
LABELS = jnp.arange(8) % 10
TARGETS = jax.nn.one_hot(LABELS, 10)
PARAMS = MODEL.init(jax.random.key(1), X)["params"]
EPS, STEPS = 8 / 255, 5
# 2-px PRM cells: a 4 x 4 grid on the 8-px images.
PRM_PATCH_SIZE = 2


@functools.partial(jax.jit, static_argnames=("ard", "prm"))
def apgd_attack(key, r, eps=EPS, *, ard=False, prm=False):
  """The AT objective's APGD training attack on (X, TARGETS)."""
  ard_fn, prm_fn = objectives.make_attack_masks(MODEL,
                                                ard=ard,
                                                prm=prm,
                                                prm_patch_size=PRM_PATCH_SIZE)
  return objectives.training_attack(
      MODEL,
      PARAMS,
      X,
      key,
      r,
      eps=eps,
      alpha=2 / 255,
      steps=STEPS,
      attack_loss=None,  # PGD's scalar loss: unused by APGD
      example_loss=lambda z: objectives.soft_cross_entropy_per_example(
          z, TARGETS),
      ard_fn=ard_fn,
      prm_fn=prm_fn,
      attack_name="apgd")


def test_the_training_attack_iterates_as_the_evaluation_apgd_ce():
  # The evaluation's APGD-CE run (the call autoattack makes: a keyed logits
  # function, the CE of integer labels) against the training attack (soft
  # CE of one-hot targets through objectives.training_attack): the same
  # highest-loss point, bitwise. Both compute the same float ops on the same
  # values (a one-hot soft CE sums exact zeros onto -log p_y), so no loss
  # comparison or sign differs and the iterates never part. (attacks.apgd
  # then reports the run's misclassified point; training keeps this one.)
  key = jax.random.key(3)
  logits_fn = lambda x: MODEL.apply({"params": PARAMS}, x)
  ce = lambda z: attacks.cross_entropy_per_example(z, LABELS)
  x_best, _, loss_best, _ = jax.jit(
      lambda k: single_run(keyed(logits_fn, False),
                           ce,
                           k,
                           X,
                           LABELS,
                           eps=EPS,
                           norm="Linf",
                           n_iter=STEPS))(key)
  ours = apgd_attack(key, 1.0)
  np.testing.assert_array_equal(ours, x_best)
  # Within the radius, and with a higher loss than the clean images'.
  assert float(jnp.abs(ours - X).max()) <= EPS + 1e-6
  assert float(loss_best.mean()) > float(ce(logits_fn(X)).mean())
  # And the epsilon warm-up's smaller radius is APGD's radius.
  half = apgd_attack(key, 1.0, EPS / 2)
  assert float(jnp.abs(half - X).max()) <= EPS / 2 + 1e-6
  assert float(jnp.abs(half - X).max()) > EPS / 4


def test_prm_zeroes_the_perturbation_outside_the_kept_cells():
  # r = 0.25: 12 of the 16 cells masked in every iteration, so the returned
  # point (a masked iterate) is perturbed on at most 4 cells.
  x_adv = apgd_attack(jax.random.key(4), 0.25, prm=True)
  cells = np.abs(np.asarray(x_adv - X)).reshape(8, 4, PRM_PATCH_SIZE, 4,
                                                PRM_PATCH_SIZE, 3)
  perturbed = (cells.max(axis=(2, 4, 5)) > 0).sum(axis=(1, 2))
  assert perturbed.max() <= 4 and perturbed.min() >= 1, perturbed
  assert float(np.abs(np.asarray(x_adv - X)).max()) <= EPS + 1e-6
  # All cells kept (r = 1): the mask changes nothing.
  np.testing.assert_array_equal(apgd_attack(jax.random.key(4), 1.0, prm=True),
                                apgd_attack(jax.random.key(4), 1.0))


def test_ard_gates_the_models_inside_the_attack():
  plain = apgd_attack(jax.random.key(5), 0.0)
  # Every attention gradient kept: the plain attack; every one dropped: not.
  np.testing.assert_array_equal(apgd_attack(jax.random.key(5), 1.0, ard=True),
                                plain)
  assert not np.array_equal(apgd_attack(jax.random.key(5), 0.0, ard=True),
                            plain)


def test_a_short_run_trains_with_apgd_ard_prm_and_the_epsilon_warm_up(tmp_path):
  # Through train.train_and_evaluate, so make_train_step's step runs with
  # APGD (ARD and PRM of the quickstart on, the epsilon warm-up's traced eps
  # scaling APGD's radius); 3 steps, a clean final evaluation.
  config = _tiny.config(
      **{
          "attack.name": "apgd",
          "attack.steps": 3,
          "attack.eps_warmup_epochs": 0.2,
          "tricks.warmup_epochs": 0.2,
          "epochs": 0.3,
          "eval.attacks": ("clean",),
          "eval.epoch_num_examples": 0,
          "log_every_steps": 1,
      })
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["steps"] == 3 and 0.0 <= result["clean_acc"] <= 1.0
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [r for r in map(json.loads, f) if "train_loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3]
  assert all(
      np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in logged)
  # The warm-up's eps, from 0 over 2 steps.
  np.testing.assert_allclose([r["train_eps"] for r in logged],
                             [0.0, EPS / 2, EPS],
                             rtol=1e-6)

"""Training objectives: the reference's TRADES / MART formulas, and where the
parameter gradient flows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _tiny
from vitat_jax import objectives

MODEL = _tiny.model(depth=2)
X = jax.random.uniform(jax.random.key(1), (8, 8, 8, 3))
LABELS = jnp.arange(8) % 10
BATCH = {"image": X, "target": jax.nn.one_hot(LABELS, 10)}
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
BUDGET = dict(eps=8 / 255, alpha=2 / 255, steps=3)


def _logits(seed, scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), (16, 10))


def test_trades_loss_matches_the_reference_statement():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  logits, logits_adv = _logits(0), _logits(1)
  labels = np.arange(16) % 10
  t_logits = torch.tensor(np.asarray(logits), dtype=torch.float64)
  t_adv = torch.tensor(np.asarray(logits_adv), dtype=torch.float64)
  # train_cifar.py, TRADES branch.
  criterion_kl = torch.nn.KLDivLoss(reduction="sum")
  expected = F.cross_entropy(
      t_logits, torch.tensor(labels)) + 6.0 * (1.0 / 16) * criterion_kl(
          F.log_softmax(t_adv, dim=1), F.softmax(t_logits, dim=1))
  ours = objectives.trades_outer_loss(logits, logits_adv,
                                      jax.nn.one_hot(labels, 10), 6.0)
  np.testing.assert_allclose(float(ours), expected.item(), rtol=1e-5)


def test_mart_loss_matches_the_reference_statement():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  logits, logits_adv = _logits(2), _logits(3)
  labels = np.arange(16) % 10
  y = torch.tensor(labels)
  t_logits = torch.tensor(np.asarray(logits), dtype=torch.float64)
  t_adv = torch.tensor(np.asarray(logits_adv), dtype=torch.float64)
  # train_cifar.py, MART branch.
  kl = torch.nn.KLDivLoss(reduction="none")
  adv_probs = F.softmax(t_adv, dim=1)
  tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
  new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
  loss_adv = F.cross_entropy(t_adv, y) + F.nll_loss(
      torch.log(1.0001 - adv_probs + 1e-12), new_y)
  nat_probs = F.softmax(t_logits, dim=1)
  true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze()
  loss_robust = (1.0 / 16) * torch.sum(
      torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) *
      (1.0000001 - true_probs))
  expected = loss_adv + 6.0 * loss_robust
  ours = objectives.mart_outer_loss(logits, logits_adv, jnp.asarray(labels),
                                    6.0)
  np.testing.assert_allclose(float(ours), expected.item(), rtol=1e-5)


def test_trades_and_mart_survive_saturated_probabilities():
  logits = jnp.zeros((2, 10)).at[:, 0].set(200.0)
  labels = jnp.zeros(2, jnp.int32)
  assert np.isfinite(
      float(objectives.mart_outer_loss(logits, logits, labels, 6.0)))
  assert np.isfinite(
      float(
          objectives.trades_outer_loss(logits, logits,
                                       jax.nn.one_hot(labels, 10), 6.0)))


def test_at_gradient_flows_only_through_the_final_forward_pass():
  # The parameter gradient of the AT objective equals the gradient of the
  # plain loss at the (fixed) adversarial batch the same key produces, with
  # no ARD gate: ARD and PRM act on the attack only.
  key, r = jax.random.key(4), 0.5
  loss_fn = functools.partial(objectives.pgd_at_loss,
                              model=MODEL,
                              ard=True,
                              prm=True,
                              prm_patch_size=4,
                              **BUDGET)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, BATCH, key, r)[0]))(PARAMS)

  attack_key, _ = jax.random.split(key)
  ard_fn, prm_fn = objectives.make_attack_masks(MODEL,
                                                ard=True,
                                                prm=True,
                                                prm_patch_size=4)
  x_adv = objectives.training_attack(
      MODEL,
      PARAMS,
      X,
      attack_key,
      r,
      attack_loss=lambda z: objectives.soft_cross_entropy(z, BATCH["target"]),
      ard_fn=ard_fn,
      prm_fn=prm_fn,
      **BUDGET)
  expected = jax.grad(lambda p: objectives.soft_cross_entropy(
      MODEL.apply({"params": p}, x_adv), BATCH["target"]))(PARAMS)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      grads, expected)


def test_ard_with_r_zero_changes_the_attack_but_r_one_does_not():
  ard_fn, _ = objectives.make_attack_masks(MODEL,
                                           ard=True,
                                           prm=False,
                                           prm_patch_size=4)
  run = lambda r, fn: objectives.training_attack(
      MODEL,
      PARAMS,
      X,
      jax.random.key(5),
      r,
      attack_loss=lambda z: objectives.soft_cross_entropy(z, BATCH["target"]),
      ard_fn=fn,
      **BUDGET)
  plain = run(0.0, None)
  np.testing.assert_array_equal(run(1.0, ard_fn), plain)  # every gate kept
  assert not np.array_equal(run(0.0, ard_fn), plain)  # every gate dropped


# APGD on AT is trained in tests/test_apgd_training.py; here its KL
# (TRADES) and CE (MART) inner losses.
@pytest.mark.parametrize("method, attack_name", [("at", "pgd"),
                                                 ("trades", "pgd"),
                                                 ("mart", "pgd"),
                                                 ("natural", "pgd"),
                                                 ("trades", "apgd"),
                                                 ("mart", "apgd")])
def test_every_method_gives_a_finite_loss_and_gradient(method, attack_name):
  import ml_collections
  config = ml_collections.ConfigDict(
      dict(method=method,
           beta=6.0,
           tricks=dict(ard=True, prm=True, prm_patch_size=4),
           attack=dict(name=attack_name, eps=8 / 255, alpha=2 / 255, steps=2)))
  objective = objectives.make_objective(config, MODEL)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      PARAMS, BATCH, jax.random.key(6), 0.3)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_trades_attack_starts_gaussian_and_stays_in_bounds():
  clean = jax.nn.softmax(MODEL.apply({"params": PARAMS}, X))
  x_adv = objectives.training_attack(
      MODEL,
      PARAMS,
      X,
      jax.random.key(7),
      1.0,
      init="gaussian",
      attack_loss=lambda z: objectives._kl_sum(clean, jax.nn.log_softmax(z)),
      **BUDGET)
  assert float(jnp.abs(x_adv - X).max()) <= 8 / 255 + 1e-6
  assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  # It moved: the KL to the clean prediction grew.
  assert float(
      objectives._kl_sum(
          clean, jax.nn.log_softmax(MODEL.apply({"params": PARAMS},
                                                x_adv)))) > 0

"""Training objectives: pure functions `(params, batch, key, r) -> (loss, metrics)`.

`batch` holds `image` (float [B, H, W, 3] in [0, 1], already augmented) and
`target` (soft labels [B, C]; one-hot for hard labels, mixed for Mixup /
CutMix). `r` is the ARD/PRM warm-up value r(t) of `masks.py`.

The inner attack runs the model in inference mode on parameters whose
gradient is stopped, so the parameter gradient flows only through the final
forward pass on the adversarial batch, and ARD/PRM act only on the attack.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vitat_jax import attacks
from vitat_jax import masks
from vitat_jax.errors import UserError

METHODS = ("at", "natural")


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_c t_c log softmax(z)_c."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -(targets * logp).sum(axis=-1).mean()


def _accuracy(logits, targets):
  return (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).mean()


def make_attack_masks(model, *, ard: bool, prm: bool):
  """The ARD keep-mask and PRM delta-mask functions of key and r, or None."""
  ard_fn = None
  prm_fn = None
  if ard:
    ard_fn = lambda key, r: masks.ard_keep(key, r, model.num_attention_blocks)
  if prm:
    prm_fn = lambda key, r: masks.prm_mask(key, r, model.grid_size,
                                          model.patch_size)
  return ard_fn, prm_fn


def training_attack(model, params, x, targets, key, r, *, eps, alpha, steps,
                    ard_fn: Optional[Callable] = None,
                    prm_fn: Optional[Callable] = None,
                    criterion: Callable = soft_cross_entropy):
  """PGD-AT's inner maximisation with ARD and PRM, in inference mode."""
  params = jax.lax.stop_gradient(params)

  def objective(x_adv, iteration_key):
    keep = None if ard_fn is None else ard_fn(iteration_key, r)
    logits = model.apply({"params": params}, x_adv, attn_keep=keep)
    return criterion(logits, targets)

  delta_mask_fn = None if prm_fn is None else (lambda k: prm_fn(k, r))
  return attacks.perturb(objective, key, x, eps=eps, alpha=alpha, steps=steps,
                         init="uniform", delta_mask_fn=delta_mask_fn)


def pgd_at_loss(params, batch, key, r, *, model, eps, alpha, steps, ard, prm):
  """Madry et al.'s adversarial training loss on the (mixed) batch."""
  attack_key, dropout_key = jax.random.split(key)
  ard_fn, prm_fn = make_attack_masks(model, ard=ard, prm=prm)
  x_adv = training_attack(model, params, batch["image"], batch["target"],
                          attack_key, r, eps=eps, alpha=alpha, steps=steps,
                          ard_fn=ard_fn, prm_fn=prm_fn)
  logits = model.apply({"params": params}, x_adv, train=True,
                       rngs={"dropout": dropout_key})
  loss = soft_cross_entropy(logits, batch["target"])
  return loss, {"loss": loss, "accuracy": _accuracy(logits, batch["target"])}


def natural_loss(params, batch, key, r, *, model):
  """Standard training on clean images (the baseline arm)."""
  del r
  logits = model.apply({"params": params}, batch["image"], train=True,
                       rngs={"dropout": key})
  loss = soft_cross_entropy(logits, batch["target"])
  return loss, {"loss": loss, "accuracy": _accuracy(logits, batch["target"])}


def check_config(config):
  if config.method not in METHODS:
    raise UserError(f"unknown method {config.method!r}: use one of "
                    f"{', '.join(METHODS)}")
  if config.method != "natural":
    attacks.check_budget(config.attack.eps, config.attack.alpha,
                         config.attack.steps)


def make_objective(config, model):
  """The objective named by `config.method`, bound to `model` and budgets."""
  check_config(config)
  if config.method == "natural":
    return functools.partial(natural_loss, model=model)
  return functools.partial(
      pgd_at_loss, model=model, eps=config.attack.eps,
      alpha=config.attack.alpha, steps=config.attack.steps,
      ard=config.ard, prm=config.prm)

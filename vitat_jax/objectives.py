"""Training objectives: pure functions `(params, batch, key, r) -> (loss, metrics)`.

`batch` holds `image` (float [B, H, W, 3] in [0, 1], already augmented) and
`target` (soft labels [B, C]; one-hot for hard labels, mixed for Mixup /
CutMix). `r` is the ARD/PRM warm-up value r(t) of `masks.py`.

The inner attack runs the model in inference mode on parameters whose
gradient is stopped, so the parameter gradient flows only through the final
forward pass on the adversarial batch, and ARD/PRM act only on the attack.

`config.method` names an entry of one registry: the built-ins "at",
"trades", "mart" and "natural", and what a script adds with
`register(name, factory)` before it trains; `make_objective` builds from it.
"""

import functools
import re
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from vitat_jax import attacks
from vitat_jax import masks
from vitat_jax.errors import UserError

# The built-in methods; `methods()` lists the registered ones too.
METHODS = ("at", "trades", "mart", "natural")
# `attack.name`: the training attack's iteration, PGD's sign steps or APGD's
# (`attacks.apgd_perturb`), either on the objective's own inner loss.
TRAINING_ATTACKS = ("pgd", "apgd")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def soft_cross_entropy_per_example(logits: jax.Array,
                                   targets: jax.Array) -> jax.Array:
  """-sum_c t_c log softmax(z)_c, one value per example (APGD's AT loss)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -(targets * logp).sum(axis=-1)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of `soft_cross_entropy_per_example`."""
  return soft_cross_entropy_per_example(logits, targets).mean()


def _accuracy(logits, targets):
  return (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).mean()


def check_prm_patch_size(prm_patch_size: int, image_size: int):
  """One line when the PRM cells do not tile the image."""
  if (not isinstance(prm_patch_size, int) or prm_patch_size <= 0 or
      image_size % prm_patch_size):
    raise UserError(
        f"prm_patch_size={prm_patch_size} must be a positive integer dividing "
        f"the image size {image_size}: the reference uses 4 px cells at 32 px "
        "and 16 px cells at 224 px")


def make_attack_masks(model, *, ard: bool, prm: bool, prm_patch_size: int):
  """The ARD keep-mask and PRM delta-mask functions of key and r, or None.

  The PRM grid is `img_size / prm_patch_size` cells per side, a setting of
  its own as the reference's `--patch` is, not the model's patch size (Swin
  at 224 px gets 14x14 cells of 16 px, as every other family).
  """
  ard_fn = None
  prm_fn = None
  if ard:
    ard_fn = lambda key, r: masks.ard_keep(key, r, model.num_attention_blocks)
  if prm:
    check_prm_patch_size(prm_patch_size, model.img_size)
    grid = model.img_size // prm_patch_size
    prm_fn = lambda key, r: masks.prm_mask(key, r, grid, prm_patch_size)
  return ard_fn, prm_fn


def gaussian_start_scale(model):
  """TRADES / MART start 0.001 N(0, 1) in the model's normalised units.

  The reference draws it after normalisation, so in pixels it is
  0.001 * std per channel.
  """
  return 0.001 * jnp.asarray(model.std, jnp.float32)


def training_attack(model,
                    params,
                    x,
                    key,
                    r,
                    *,
                    eps,
                    alpha,
                    steps,
                    attack_loss: Callable[[jax.Array], jax.Array],
                    init: str = "uniform",
                    ard_fn: Optional[Callable] = None,
                    prm_fn: Optional[Callable] = None,
                    attack_name: str = "pgd",
                    example_loss: Optional[Callable] = None):
  """The inner maximisation of the objective's attack loss, with ARD and PRM.

  The model runs in inference mode on parameters whose gradient is stopped;
  ARD keep-masks and PRM masks are drawn afresh in every iteration.
  `attack_name` "pgd": `steps` sign steps of `alpha` from `init` on the
  scalar `attack_loss(logits)`; "apgd": `steps` APGD iterations
  (`attacks.apgd_perturb`: its own start and step sizes, so `alpha` and
  `init` are unused) on `example_loss(logits) -> [B]`, the same loss per
  example.
  """
  params = jax.lax.stop_gradient(params)

  def logits_fn(x_adv, iteration_key):
    keep = None if ard_fn is None else ard_fn(iteration_key, r)
    return model.apply({"params": params}, x_adv, attn_keep=keep)

  delta_mask_fn = None if prm_fn is None else (lambda k: prm_fn(k, r))
  if attack_name == "apgd":
    return attacks.apgd_perturb(logits_fn,
                                example_loss,
                                key,
                                x,
                                eps=eps,
                                n_iter=steps,
                                delta_mask_fn=delta_mask_fn)
  objective = lambda x_adv, k: attack_loss(logits_fn(x_adv, k))
  return attacks.perturb(objective,
                         key,
                         x,
                         eps=eps,
                         alpha=alpha,
                         steps=steps,
                         init=init,
                         gaussian_scale=gaussian_start_scale(model),
                         delta_mask_fn=delta_mask_fn)


def pgd_at_loss(params,
                batch,
                key,
                r,
                eps_scale=1.0,
                *,
                model,
                eps,
                alpha,
                steps,
                ard,
                prm,
                prm_patch_size,
                attack_name="pgd"):
  """Madry et al.'s adversarial training loss on the (mixed) batch.

  `eps_scale` scales the attack's radius and step (the epsilon warm-up's
  eps(t) / attack.eps), as in every adversarial objective here;
  `attack_name` is `training_attack`'s (APGD maximises the per-example soft
  CE).
  """
  eps, alpha = eps * eps_scale, alpha * eps_scale
  attack_key, dropout_key = jax.random.split(key)
  ard_fn, prm_fn = make_attack_masks(model,
                                     ard=ard,
                                     prm=prm,
                                     prm_patch_size=prm_patch_size)
  targets = batch["target"]
  x_adv = training_attack(
      model,
      params,
      batch["image"],
      attack_key,
      r,
      eps=eps,
      alpha=alpha,
      steps=steps,
      attack_loss=lambda z: soft_cross_entropy(z, targets),
      ard_fn=ard_fn,
      prm_fn=prm_fn,
      attack_name=attack_name,
      example_loss=lambda z: soft_cross_entropy_per_example(z, targets))
  logits = model.apply({"params": params},
                       x_adv,
                       train=True,
                       rngs={"dropout": dropout_key})
  loss = soft_cross_entropy(logits, targets)
  return loss, {"loss": loss, "accuracy": _accuracy(logits, targets)}


def _kl_sum(p_target, log_q):
  """sum_i sum_c p log(p / q): torch's KLDivLoss(reduction="sum")(log_q, p)."""
  return jnp.sum(xlogy(p_target, p_target) - p_target * log_q)


def _kl_per_example(p_target, logits):
  """sum_c p log(p / q), q = softmax(logits), per example (TRADES' APGD
  loss)."""
  # float32, as APGD compares these losses across iterations.
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.sum(xlogy(p_target, p_target) - p_target * log_q, axis=-1)


def trades_outer_loss(logits, logits_adv, targets, beta, logits_target=None):
  """CE(f(x), y) + beta * sum KL(softmax(f(x)) || softmax(f(x'))) / batch.

  `logits_target`: the clean logits of the KL target when they come from a
  forward of their own (a stochastic model); by default `logits`.
  """
  if logits_target is None:
    logits_target = logits
  natural = soft_cross_entropy(logits, targets)
  robust = _kl_sum(jax.nn.softmax(logits_target.astype(jnp.float32)),
                   jax.nn.log_softmax(logits_adv.astype(jnp.float32)))
  return natural + beta * robust / logits.shape[0]


def mart_outer_loss(logits, logits_adv, labels, beta):
  """The reference's MART loss from clean and adversarial logits."""
  adv_probs = jax.nn.softmax(logits_adv.astype(jnp.float32))
  # The most likely class other than the label (ties as argsort breaks them).
  top2 = jnp.argsort(adv_probs, axis=-1)[:, -2:]
  wrong = jnp.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
  margin_term = -jnp.log(1.0001 - jnp.take_along_axis(
      adv_probs, wrong[:, None], axis=-1)[:, 0] + 1e-12).mean()
  loss_adv = attacks.cross_entropy_per_example(logits_adv, labels).mean() + \
      margin_term
  nat_probs = jax.nn.softmax(logits.astype(jnp.float32))
  true_probs = jnp.take_along_axis(nat_probs, labels[:, None], axis=-1)[:, 0]
  kl = jnp.sum(xlogy(nat_probs, nat_probs) -
               nat_probs * jnp.log(adv_probs + 1e-12),
               axis=-1)
  robust = jnp.sum(kl * (1.0000001 - true_probs)) / logits.shape[0]
  return loss_adv + beta * robust


# The model fields that make a train-mode forward draw random masks.
_STOCHASTIC_RATES = ("drop_rate", "attn_drop_rate", "proj_drop_rate",
                     "drop_path_rate")


def is_stochastic(model) -> bool:
  """Whether a train-mode forward of `model` draws dropout or drop-path
  masks (any of the families' rates above 0)."""
  return any(getattr(model, name, 0.0) > 0 for name in _STOCHASTIC_RATES)


def _train_logits(model, params, x, key):
  return model.apply({"params": params}, x, train=True, rngs={"dropout": key})


def _clean_and_adversarial_logits(model, params, x, x_adv, dropout_key):
  """Training-mode logits on the clean and the adversarial batch."""
  natural_key, adversarial_key = jax.random.split(dropout_key)
  return (_train_logits(model, params, x, natural_key),
          _train_logits(model, params, x_adv, adversarial_key))


def trades_loss(params,
                batch,
                key,
                r,
                eps_scale=1.0,
                *,
                model,
                eps,
                alpha,
                steps,
                ard,
                prm,
                prm_patch_size,
                beta=6.0,
                attack_name="pgd"):
  """TRADES (Zhang et al. 2019) as the reference implements it.

  Inner: maximise KL(softmax(f(x)) || softmax(f(x + delta))) from
  delta = 0.001 N(0, 1) in normalised units (APGD: the same KL per example,
  from APGD's own start). Outer: CE(f(x), y) + beta * KL_sum / batch.
  A stochastic model (dropout or drop-path, e.g. Swin) runs the clean batch
  twice in train mode, as the reference does: one draw for the CE term, one
  for the KL target.
  """
  eps, alpha = eps * eps_scale, alpha * eps_scale
  attack_key, dropout_key = jax.random.split(key)
  ard_fn, prm_fn = make_attack_masks(model,
                                     ard=ard,
                                     prm=prm,
                                     prm_patch_size=prm_patch_size)
  x, targets = batch["image"], batch["target"]
  clean_probs = jax.nn.softmax(
      model.apply({"params": jax.lax.stop_gradient(params)}, x))
  x_adv = training_attack(
      model,
      params,
      x,
      attack_key,
      r,
      eps=eps,
      alpha=alpha,
      steps=steps,
      attack_loss=lambda z: _kl_sum(clean_probs, jax.nn.log_softmax(z)),
      init="gaussian",
      ard_fn=ard_fn,
      prm_fn=prm_fn,
      attack_name=attack_name,
      example_loss=functools.partial(_kl_per_example, clean_probs))
  if is_stochastic(model):
    # The reference's outer step runs three train-mode forwards, each with
    # its own drop-path / dropout draw: model(X) for the CE term,
    # model(x_adv), and model(X) again for the KL target
    # softmax(model(X)) (not detached: torch's KLDivLoss differentiates its
    # target too).
    natural_key, adversarial_key, target_key = jax.random.split(dropout_key, 3)
    logits = _train_logits(model, params, x, natural_key)
    logits_adv = _train_logits(model, params, x_adv, adversarial_key)
    logits_target = _train_logits(model, params, x, target_key)
  else:
    # Deterministic forwards: the two clean ones are one.
    logits, logits_adv = _clean_and_adversarial_logits(model, params, x, x_adv,
                                                       dropout_key)
    logits_target = None
  loss = trades_outer_loss(logits, logits_adv, targets, beta, logits_target)
  return loss, {
      "loss": loss,
      "accuracy": _accuracy(logits, targets),
      "adversarial_accuracy": _accuracy(logits_adv, targets)
  }


def mart_loss(params,
              batch,
              key,
              r,
              eps_scale=1.0,
              *,
              model,
              eps,
              alpha,
              steps,
              ard,
              prm,
              prm_patch_size,
              beta=6.0,
              attack_name="pgd"):
  """MART (Wang et al. 2020) as the reference implements it.

  Inner: CE steps from delta = 0.001 N(0, 1) in normalised units (APGD: on
  the per-example CE, from its own start). Outer: CE(f(x'), y) +
  NLL(log(1.0001 - p' + 1e-12), best wrong class) + beta * mean(sum_c
  KL(p || p') * (1.0000001 - p_y)).
  """
  eps, alpha = eps * eps_scale, alpha * eps_scale
  attack_key, dropout_key = jax.random.split(key)
  ard_fn, prm_fn = make_attack_masks(model,
                                     ard=ard,
                                     prm=prm,
                                     prm_patch_size=prm_patch_size)
  x, targets = batch["image"], batch["target"]
  labels = jnp.argmax(targets, axis=-1)
  x_adv = training_attack(
      model,
      params,
      x,
      attack_key,
      r,
      eps=eps,
      alpha=alpha,
      steps=steps,
      attack_loss=lambda z: attacks.cross_entropy_per_example(z, labels).mean(),
      init="gaussian",
      ard_fn=ard_fn,
      prm_fn=prm_fn,
      attack_name=attack_name,
      example_loss=lambda z: attacks.cross_entropy_per_example(z, labels))
  logits, logits_adv = _clean_and_adversarial_logits(model, params, x, x_adv,
                                                     dropout_key)
  loss = mart_outer_loss(logits, logits_adv, labels, beta)
  return loss, {"loss": loss, "accuracy": _accuracy(logits_adv, targets)}


def natural_loss(params, batch, key, r, eps_scale=1.0, *, model):
  """Standard training on clean images (the baseline arm)."""
  del r, eps_scale
  logits = model.apply({"params": params},
                       batch["image"],
                       train=True,
                       rngs={"dropout": key})
  loss = soft_cross_entropy(logits, batch["target"])
  return loss, {"loss": loss, "accuracy": _accuracy(logits, batch["target"])}


def adversarial_kwargs(config, model) -> dict:
  """The keywords of `pgd_at_loss` & co. from a checked config: the model,
  the training attack (its name and budget) and ARD / PRM."""
  return dict(model=model,
              attack_name=config.attack.name,
              eps=config.attack.eps,
              alpha=config.attack.alpha,
              steps=config.attack.steps,
              ard=config.tricks.ard,
              prm=config.tricks.prm,
              prm_patch_size=config.tricks.prm_patch_size)


# name -> factory(config, model) -> objective; the built-ins first.
_FACTORIES: Dict[str, Callable] = {
    "at":
        lambda config, model: functools.partial(
            pgd_at_loss, **adversarial_kwargs(config, model)),
    "trades":
        lambda config, model: functools.partial(
            trades_loss, beta=config.beta, **adversarial_kwargs(config, model)),
    "mart":
        lambda config, model: functools.partial(
            mart_loss, beta=config.beta, **adversarial_kwargs(config, model)),
    "natural":
        lambda config, model: functools.partial(natural_loss, model=model),
}


def register(name: str, factory: Callable) -> None:
  """Makes `config.method=name` train with `factory(config, model)`.

  The factory returns an objective `(params, batch, key, r, eps_scale=1.0)
  -> (loss, metrics)` as the built-ins do (`adversarial_kwargs` gives their
  bound keywords); `metrics` holds at least "loss". Call it before training
  (or resuming) in the script that runs `train.train_and_evaluate`: names
  resolve to registered functions only. Registering a name again replaces
  it; the built-in names cannot be replaced.
  """
  if not isinstance(name, str) or not _NAME.match(name):
    raise UserError(f"objective name {name!r} must be lowercase letters, "
                    "digits and underscores, starting with a letter")
  if name in METHODS:
    raise UserError(f"objective {name!r} is built in: register yours under "
                    "another name")
  if not callable(factory):
    raise UserError(f"objective {name!r}: the factory must be a function "
                    "(config, model) -> objective")
  _FACTORIES[name] = factory


def methods() -> Tuple[str, ...]:
  """The names `config.method` may take: built-in, then registered."""
  return tuple(_FACTORIES)


def make_objective(config, model):
  """The objective named by `config.method`, bound to `model` and budgets
  (the config checked by `validate.check_config`)."""
  return _FACTORIES[config.method](config, model)

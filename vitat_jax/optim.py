"""Optimisers as optax chains: clip -> weight decay -> SGD/AdamW + schedules.

The paper's recipe (and the default): global-norm clipping at 1.0, then
weight decay 1e-4 added to the gradient (PyTorch SGD semantics, on all
parameters), then SGD with momentum 0.9 and a piecewise learning rate that
drops 10x at E - 5 and again at E - 2 epochs. Schedules are functions of the
fractional epoch t = update_count / steps_per_epoch.
"""

import optax
import jax.numpy as jnp

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cyclic", "cosine", "constant")


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """A duration in (fractional) epochs as a whole number of steps.

  The one rounding of every duration: the training loop's length and the
  schedules' horizons.
  """
  return int(round(epochs * steps_per_epoch))


def piecewise_lr(base_lr: float, epochs: float, steps_per_epoch: int):
  """lr for t < E - 5, lr / 10 for t < E - 2, lr / 100 after (reference)."""

  def schedule(count):
    t = count / steps_per_epoch
    return jnp.where(t < epochs - 5, base_lr,
                     jnp.where(t < epochs - 2, base_lr * 0.1, base_lr * 0.01))

  return schedule


def cyclic_lr(base_lr: float,
              epochs: float,
              steps_per_epoch: int,
              peak_fraction: float = 0.4):
  """Triangular one-cycle: 0 -> lr at peak_fraction * E -> 0 at E."""

  def schedule(count):
    t = count / steps_per_epoch
    peak = peak_fraction * epochs
    return base_lr * jnp.interp(t, jnp.array([0.0, peak, epochs]),
                                jnp.array([0.0, 1.0, 0.0]))

  return schedule


def learning_rate_schedule(config, epochs: float, steps_per_epoch: int):
  """The schedule named by `config.schedule` as a function of update count."""
  total = epochs_to_steps(epochs, steps_per_epoch)
  if config.schedule == "piecewise":
    return piecewise_lr(config.lr, epochs, steps_per_epoch)
  if config.schedule == "cyclic":
    return cyclic_lr(config.lr, epochs, steps_per_epoch)
  if config.schedule == "cosine":
    warmup = epochs_to_steps(config.warmup_epochs, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, max(warmup, 1),
                                              max(total, warmup + 1))
  if config.schedule == "constant":
    return optax.constant_schedule(config.lr)
  raise ValueError(f"schedule {config.schedule!r} is none of {SCHEDULES}: "
                   "check the config with validate.check_config")


def make_optimizer(config, epochs: float, steps_per_epoch: int):
  """The optax chain for `config` (an `optim` ConfigDict section).

  Returns:
    (optax.GradientTransformation, the learning-rate schedule).

  The config is trusted: `validate.check_config` owns its rules.
  """
  schedule = learning_rate_schedule(config, epochs, steps_per_epoch)
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if config.name == "sgd":
    if config.weight_decay > 0:
      # Coupled decay, as torch.optim.SGD(weight_decay=...): added to the
      # (clipped) gradient before momentum.
      parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(
        optax.sgd(schedule,
                  momentum=config.momentum or None,
                  nesterov=config.nesterov))
  else:
    parts.append(
        optax.adamw(schedule,
                    b1=config.b1,
                    b2=config.b2,
                    weight_decay=config.weight_decay))
  return optax.chain(*parts), schedule

"""The training step: augment, attack and update, one jitted function.

    train_step = jax.jit(make_train_step(config, model, objective, tx,
                                         schedule, steps_per_epoch,
                                         num_classes), donate_argnums=0)
    state, metrics = train_step(state, images_uint8, labels, loop_key)

All randomness of step s comes from `fold_in(loop_key, s)`: augmentation,
Mixup/CutMix, the training attack and its ARD/PRM masks, whose rate r(t)
follows the warm-up at the fractional epoch t = s / steps_per_epoch. With
`ema.decay` > 0 the step also updates the params' moving average; with
`attack.eps_warmup_epochs` > 0 the training attack's radius and step ramp
up from `attack.eps_warmup_floor` (`masks.eps_scale`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitat_jax import masks
from vitat_jax.data import augment
from vitat_jax.data import mixup
from vitat_jax.data import randaugment
from vitat_jax.state import ema_decay
from vitat_jax.state import TrainState
from vitat_jax.state import update_ema


def accumulate_gradients(grad_fn,
                         params,
                         batch,
                         key,
                         r,
                         accum_steps: int,
                         eps_scale=1.0):
  """Mean gradient and metrics of `grad_fn` over `accum_steps` micro-batches.

  As the reference's --accum-steps: each micro-batch contributes the
  gradient of loss / accum_steps, and the optimiser (clipping included)
  then steps once on the sum. Micro-batch m holds rows m, m + A, m + 2A, ...
  so that each device keeps its own rows of a batch-sharded array.
  Micro-batch m uses the key `fold_in(key, m)`. (The reference calls
  `opt.zero_grad()` before every micro-batch's backward, so there only the
  last micro-batch's gradient survives; this is the documented intent.)
  """

  def split(a):
    a = a.reshape(a.shape[0] // accum_steps, accum_steps, *a.shape[1:])
    return jnp.swapaxes(a, 0, 1)

  def body(total, inputs):
    index, micro_batch = inputs
    (_, metrics), grads = grad_fn(params, micro_batch,
                                  jax.random.fold_in(key, index), r, eps_scale)
    return jax.tree.map(jnp.add, total, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  total, metrics = jax.lax.scan(
      body, zeros, (jnp.arange(accum_steps), jax.tree.map(split, batch)))
  grads = jax.tree.map(lambda g: g / accum_steps, total)
  return grads, jax.tree.map(lambda m: m.mean(axis=0), metrics)


def make_train_step(config, model, objective, tx, schedule,
                    steps_per_epoch: int, num_classes: int):
  """`train_step(state, images_uint8, labels, loop_key) -> (state, metrics)`."""
  padding = config.augment.crop_padding
  flip = config.augment.flip
  mix = config.mixup
  # As in the reference, Mixup/CutMix feed PGD-AT (and natural) batches;
  # TRADES and MART train on the plain labels.
  use_mixup = mix.prob > 0 and config.method in ("at", "natural")
  accum_steps = config.accum_steps
  randaugment_spec = config.augment.randaugment
  # timm's create_transform fills with the mean the model normalises with.
  randaugment_fill = randaugment.fill_color(model.mean)
  use_ema = config.ema.decay > 0

  def train_step(state, images, labels, loop_key):
    step_key = jax.random.fold_in(loop_key, state.step)
    augment_key, mixup_key, objective_key = jax.random.split(step_key, 3)
    x = augment.to_float(images)
    if randaugment_spec:
      augment_key, randaugment_key = jax.random.split(augment_key)
    if padding or flip:
      x = augment.random_crop_flip(augment_key, x, padding=padding, flip=flip)
    if randaugment_spec:
      x = randaugment.randaugment(randaugment_key,
                                  x,
                                  randaugment_spec,
                                  fill=randaugment_fill)
    if use_mixup:
      x, targets = mixup.mixup_cutmix(mixup_key,
                                      x,
                                      labels,
                                      num_classes,
                                      mixup_alpha=mix.mixup_alpha,
                                      cutmix_alpha=mix.cutmix_alpha,
                                      prob=mix.prob,
                                      switch_prob=mix.switch_prob,
                                      label_smoothing=mix.label_smoothing)
    else:
      targets = mixup.smooth_one_hot(labels, num_classes, mix.label_smoothing)
    batch = {"image": x, "target": targets}
    t = masks.fractional_epoch(state.step, steps_per_epoch)
    r = masks.warmup_value(t, config.tricks.warmup_epochs,
                           config.tricks.final_keep_rate)
    eps_scale = masks.eps_scale(state.step, steps_per_epoch,
                                config.attack.eps_warmup_epochs,
                                config.attack.eps_warmup_floor)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, objective_key, r,
                                    eps_scale)
    else:
      grads, metrics = accumulate_gradients(grad_fn, state.params, batch,
                                            objective_key, r, accum_steps,
                                            eps_scale)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics,
                   grad_norm=optax.global_norm(grads),
                   lr=schedule(state.step),
                   r=r)
    if config.attack.eps_warmup_epochs > 0:
      metrics["eps"] = config.attack.eps * eps_scale
    ema_params = state.ema_params
    if use_ema:
      decay = ema_decay(config, state.step)
      ema_params = update_ema(ema_params, params, decay)
      metrics["ema_decay"] = decay
    return TrainState(state.step + 1, params, opt_state, ema_params), metrics

  return train_step


def mean_metrics(history):
  """The host-side mean of each metric over a list of steps' metrics."""
  host = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def check_finite(metrics, step, config):
  """A one-line FloatingPointError for a non-finite loss or gradient norm."""
  for name in ("loss", "grad_norm"):
    if not math.isfinite(metrics[name]):
      hint = (" (gradient clipping is off: set optim.grad_clip=1.0)"
              if config.optim.grad_clip <= 0 else
              " (check the data for NaN/Inf, or lower optim.lr)")
      raise FloatingPointError(
          f"non-finite {name}={metrics[name]} at step {step}{hint}; the last "
          "good checkpoint is kept")

"""Optimisers as optax chains: clip -> weight decay -> SGD/AdamW + schedules.

The paper's recipe (and the default): global-norm clipping at 1.0, then
weight decay 1e-4 added to the gradient (PyTorch SGD semantics, on all
parameters), then SGD with momentum 0.9 and a piecewise learning rate that
drops 10x at E - 5 and again at E - 2 epochs. Schedules are functions of the
fractional epoch t = update_count / steps_per_epoch.

The piecewise schedule's drops are `optim.milestones`, counted from the
end of the run (`optim.milestones_from="end"`, the reference's (5, 2): E - 5
and E - 2) or from its start ("start": absolute epochs, e.g. (36, 38)). A
run no longer than the first drop from the end never trains at `optim.lr`:
`lr_warning` says so (`setup.prepare` logs it once for training, `log_lr_warning`).

Parameter groups (`param_groups.py`): weight decay is masked off the leaves
`optim.no_decay` names (AdamW's default: biases, norms, tokens, position
tables; SGD's: none, the reference's), and `optim.layer_decay` scales each
leaf's whole update (decoupled decay included, as timm's per-group lr does)
by layer_decay ** (L - layer id), after clipping and the optimiser. With
neither, the chain is the one without groups, bit for bit.
"""

from typing import Optional, Sequence

from absl import logging
import numpy as np
import optax
import jax
import jax.numpy as jnp

from vitat_jax import param_groups
from vitat_jax import model_names

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cyclic", "cosine", "constant")
MILESTONES_FROM = ("end", "start")


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """A duration in (fractional) epochs as a whole number of steps.

  The one rounding of every duration: the training loop's length and the
  schedules' horizons.
  """
  return int(round(epochs * steps_per_epoch))


def milestone_epochs(milestones: Sequence[float], milestones_from: str,
                     epochs: float) -> tuple[float, ...]:
  """The epochs at which the piecewise lr drops 10x: `milestones` as
  given ("start") or counted back from `epochs` ("end")."""
  if milestones_from == "end":
    return tuple(float(epochs - m) for m in milestones)
  return tuple(float(m) for m in milestones)


def piecewise_lr(base_lr: float,
                 epochs: float,
                 steps_per_epoch: int,
                 milestones: Sequence[float] = (5, 2),
                 milestones_from: str = "end"):
  """base_lr divided by 10 at each milestone epoch (`milestone_epochs`):
  with the defaults lr for t < E - 5, lr / 10 for t < E - 2, lr / 100 after
  (the reference's)."""
  # NumPy constants: building the schedule compiles nothing.
  drops = np.asarray(milestone_epochs(milestones, milestones_from, epochs),
                     np.float32)
  # lr, lr * 0.1, lr * 0.01, ... as the reference writes them (0.1**2 is
  # not 0.01 in floating point).
  levels = np.asarray([base_lr * 10.0**-k for k in range(len(drops) + 1)],
                      np.float32)

  def schedule(count):
    t = count / steps_per_epoch
    return jnp.asarray(levels)[jnp.sum(t >= drops)]

  return schedule


def lr_warning(config, epochs: float) -> Optional[str]:
  """One line when the piecewise lr never reaches `config.lr` (the first
  drop at or before epoch 0), else None."""
  if config.schedule != "piecewise" or not config.milestones:
    return None
  drops = milestone_epochs(config.milestones, config.milestones_from, epochs)
  if drops[0] > 0:
    return None
  start_lr = config.lr * 0.1**sum(d <= 0 for d in drops)
  return (
      f"the lr never reaches optim.lr={config.lr:g}: a {epochs:g}-epoch run "
      f"with optim.milestones={tuple(config.milestones)} counted from the "
      f"{config.milestones_from} drops it at epochs "
      f"{', '.join(f'{d:g}' for d in drops)}, so it trains at "
      f"{start_lr:g} from step 1; set optim.milestones_from=start with "
      "milestones inside the run (e.g. optim.milestones="
      f"({epochs * 0.9:g},)), or optim.schedule=constant")


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


def log_lr_warning(config, epochs: float) -> Optional[str]:
  """Logs `lr_warning`'s line (if any) as a warning; returns it."""
  warning = lr_warning(config, epochs)
  if warning:
    logging.warning("%s", warning)
  return warning


def learning_rate_schedule(config, epochs: float, steps_per_epoch: int):
  """The schedule named by `config.schedule` as a function of update count."""
  total = epochs_to_steps(epochs, steps_per_epoch)
  if config.schedule == "piecewise":
    return piecewise_lr(config.lr, epochs, steps_per_epoch, config.milestones,
                        config.milestones_from)
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


def scale_by_layer(layer_decay: float) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its `param_groups.layer_scales`
  factor: the same as scaling that leaf's lr (momentum and Adam's moments
  do not depend on the lr), decoupled weight decay included."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = param_groups.layer_scales(layer_decay, updates)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * scales[param_groups.path_name(path)], updates)
    return scaled, state

  return optax.GradientTransformation(init, update)


def log_param_groups(config, params) -> str:
  """Logs `param_groups.describe`'s line for `config` (an `optim` section)
  and `params` (arrays or shapes); returns it."""
  line = param_groups.describe(config, params)
  logging.info("%s", line)
  return line


def make_optimizer(config,
                   epochs: float,
                   steps_per_epoch: int,
                   model_name: str = ""):
  """The optax chain for `config` (an `optim` ConfigDict section) and the
  model `model_name` (whose family sets the SGD momentum left at None).

  Returns:
    (optax.GradientTransformation, the learning-rate schedule).

  The config is trusted: `validate.check_config` owns its rules.
  """
  schedule = learning_rate_schedule(config, epochs, steps_per_epoch)
  mask = param_groups.decay_mask(config)
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if config.name == "sgd":
    if config.weight_decay > 0:
      # Coupled decay, as torch.optim.SGD(weight_decay=...): added to the
      # (clipped) gradient before momentum.
      parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(
        optax.sgd(
            schedule,
            momentum=model_names.sgd_momentum(config.momentum, model_name) or
            None,
            nesterov=config.nesterov))
  else:
    parts.append(
        optax.adamw(schedule,
                    b1=config.b1,
                    b2=config.b2,
                    weight_decay=config.weight_decay,
                    mask=mask))
  if param_groups.layer_decay_on(config.layer_decay):
    parts.append(scale_by_layer(config.layer_decay))
  return optax.chain(*parts), schedule

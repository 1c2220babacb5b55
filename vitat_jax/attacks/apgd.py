"""APGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T.

Follows the reference implementation (fra31/auto-attack, autopgd_base.py):
step size 2 * eps, momentum 0.75, the checkpoint schedule p_j
(n_iter_2 = 0.22 n, n_iter_min = 0.06 n, size_decr = 0.03 n), step halving
when fewer than rho = 0.75 of the last steps raised the loss or the best loss
did not improve since the last checkpoint with the same step size, a restart
from the best point after every halving, and `x_best_adv` tracking. The
iterations are a `lax.fori_loop` over fixed-shape batches; every example runs
the whole loop (examples are independent, so this equals the reference's
running on the still-robust subset). Iteration i uses `fold_in(key, i)`,
which only matters for randomised models (EOT) and ARD's keep-masks.

Each evaluation attack returns the adversarial images: the first
misclassified iterate found for the examples it broke and the clean image for
all the others (as the reference does). `perturb` is APGD as the training
attack: the same iteration (`single_run`), with PRM's mask on the
perturbation and ARD's keep-masks through the model's key, returning the
highest-loss point.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.attacks.pgd import cross_entropy_per_example
from vitat_jax.errors import UserError

NORMS = ("Linf", "L2")
MOMENTUM = 0.75


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3): the untargeted DLR loss."""
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  top_is_label = jnp.argmax(logits, axis=-1) == labels
  z_other = jnp.where(top_is_label, z_sorted[:, -2], z_sorted[:, -1])
  return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: jax.Array, labels: jax.Array,
                      targets: jax.Array) -> jax.Array:
  """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): the targeted DLR loss."""
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 *
                         (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


UNTARGETED_LOSSES = {"ce": cross_entropy_per_example, "dlr": dlr_loss}


def checkpoint_schedule(n_iter: int):
  """Which iterations are checkpoints, and each checkpoint's window length.

  The reference counts iterations since the last checkpoint and checks when
  the count reaches k, k starting at 0.22 n and shrinking by 0.03 n (to at
  least 0.06 n) after every check; this is that schedule, unrolled.
  """
  k = max(int(0.22 * n_iter), 1)
  k_min = max(int(0.06 * n_iter), 1)
  size_decr = max(int(0.03 * n_iter), 1)
  is_checkpoint = np.zeros(n_iter, bool)
  window = np.zeros(n_iter, np.int32)
  counter = 0
  for i in range(n_iter):
    counter += 1
    if counter == k:
      is_checkpoint[i], window[i] = True, k
      k, counter = max(k - size_decr, k_min), 0
  return is_checkpoint, window


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _l2(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1))


def _linf(v: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(v).reshape(v.shape[0], -1), axis=-1)


def _normalize(v: jax.Array, norm: str) -> jax.Array:
  size = _linf(v) if norm == "Linf" else _l2(v)
  return v / (_per_example(size, v) + 1e-12)


def _project(x: jax.Array, x_adv: jax.Array, eps: float, norm: str):
  """Onto the eps-ball around x, then onto the box [0, 1]."""
  if norm == "Linf":
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
  delta = x_adv - x
  radius = jnp.minimum(eps, _per_example(_l2(delta), delta))
  return jnp.clip(x + _normalize(delta, norm) * radius, 0.0, 1.0)


def random_start(key, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """The reference's start: a random point on the eps-sphere, in the box."""
  if norm == "Linf":
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(x + eps * _normalize(t, norm), 0.0, 1.0)


def check_apgd_args(eps: float, norm: str, n_iter: int, n_restarts: int,
                    eot_iter: int):
  if not 0 < eps:
    raise UserError(f"eps={eps} must be positive (pixel units: 8/255 is "
                    f"{8 / 255:.4f})")
  if norm not in NORMS:
    raise UserError(f"unknown APGD norm {norm!r}: use 'Linf' or 'L2'")
  for name, value in (("n_iter", n_iter), ("n_restarts", n_restarts),
                      ("eot_iter", eot_iter)):
    if value <= 0:
      raise UserError(f"APGD {name}={value} must be a positive integer")


def keyed(logits_fn: Callable, stochastic: bool) -> Callable:
  """`model(x, key) -> logits` from a deterministic or randomised logits_fn."""
  if stochastic:
    return logits_fn
  return lambda x, key: logits_fn(x)


def single_run(model: Callable,
               loss_fn: Callable,
               key,
               x: jax.Array,
               y: jax.Array,
               *,
               eps: float,
               norm: str,
               n_iter: int,
               eot_iter: int = 1,
               rho: float = 0.75,
               delta_mask_fn: Optional[Callable] = None):
  """One APGD run from a random start: the core that the evaluation's
  APGD attacks and the training attack (`perturb`) share.

  (Long on purpose: it follows fra31's `attack_single_run` step by step,
  step-size halving and checkpoints included, so the port can be audited
  line by line.)

  Args:
    model: `model(x, key) -> logits`; the key is the iteration's own
      (`fold_in(loop_key, i)`; the start's is i = n_iter), for EOT draws or
      the training attack's ARD keep-masks.
    loss_fn: `loss_fn(logits) -> [B]`, to maximise.
    delta_mask_fn: PRM (training only): `delta_mask_fn(key) -> mask`
      broadcastable to x. Every point whose loss is computed (the start and
      each iterate) has its perturbation multiplied by a fresh mask first,
      as the PGD training loop does; the mask's key is split from the
      iteration's, and the model then gets the other half. None (the
      evaluation's): the model gets the iteration's key itself.

  Returns:
    (x_best, robust, loss_best, x_best_adv): the highest-loss point, whether
    every iterate was classified correctly, its loss, and the last
    misclassified iterate (the start where there was none).
  """
  start_key, loop_key = jax.random.split(key)
  is_checkpoint, window = (jnp.asarray(a) for a in checkpoint_schedule(n_iter))

  def masked(x_adv, iteration_key):
    """(x_adv with its perturbation masked, the model's key)."""
    if delta_mask_fn is None:
      return x_adv, iteration_key
    mask_key, model_key = jax.random.split(iteration_key)
    return x + (x_adv - x) * delta_mask_fn(mask_key), model_key

  def loss_and_grad(x_adv, grad_key):

    def total(x_in, draw_key):
      logits = model(x_in, draw_key)
      loss = loss_fn(logits)
      return loss.sum(), (logits, loss)

    def draw(e, acc):
      grad, _ = acc
      g, aux = jax.grad(total, has_aux=True)(x_adv,
                                             jax.random.fold_in(grad_key, e))
      return grad + g, aux

    if eot_iter == 1:
      grad, (logits, loss) = jax.grad(total, has_aux=True)(x_adv, grad_key)
      return grad, logits, loss
    # EOT: average the gradient over draws; logits and loss of the last one.
    aux0 = jax.eval_shape(lambda: total(x_adv, grad_key)[1])
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
    grad, (logits, loss) = jax.lax.fori_loop(0, eot_iter, draw,
                                             (jnp.zeros_like(x_adv), aux0))
    return grad / eot_iter, logits, loss

  x_adv, start_model_key = masked(random_start(start_key, x, eps, norm),
                                  jax.random.fold_in(loop_key, n_iter))
  grad, logits, loss = loss_and_grad(x_adv, start_model_key)
  batch = x.shape[0]
  state = dict(x_adv=x_adv,
               x_adv_old=x_adv,
               grad=grad,
               x_best=x_adv,
               grad_best=grad,
               x_best_adv=x_adv,
               loss_best=loss,
               robust=jnp.argmax(logits, axis=-1) == y,
               step=jnp.full((batch,), 2.0 * eps, x.dtype),
               loss_steps=jnp.zeros((n_iter, batch), jnp.float32),
               loss_best_last_check=loss,
               reduced_last_check=jnp.ones((batch,), bool))

  def direction(g):
    return jnp.sign(g) if norm == "Linf" else _normalize(g, norm)

  def body(i, s):
    ex = lambda v: _per_example(v, x)
    a = jnp.where(i > 0, MOMENTUM, 1.0)
    momentum = s["x_adv"] - s["x_adv_old"]
    z = _project(x, s["x_adv"] + ex(s["step"]) * direction(s["grad"]), eps,
                 norm)
    x_new = _project(x, s["x_adv"] + (z - s["x_adv"]) * a + momentum * (1 - a),
                     eps, norm)
    x_new, model_key = masked(x_new, jax.random.fold_in(loop_key, i))
    grad, logits, loss = loss_and_grad(x_new, model_key)

    correct = jnp.argmax(logits, axis=-1) == y
    x_best_adv = jnp.where(ex(~correct), x_new, s["x_best_adv"])
    loss_steps = s["loss_steps"].at[i].set(loss)
    improved = loss > s["loss_best"]
    x_best = jnp.where(ex(improved), x_new, s["x_best"])
    grad_best = jnp.where(ex(improved), grad, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])

    # Checkpoint: did at most rho of the last k steps raise the loss (the
    # reference's row i - k is the not yet written last row at the first
    # checkpoint, hence the roll), or did the best loss stall?
    k = window[i]
    rows = jnp.arange(n_iter)[:, None]
    increased = loss_steps > jnp.roll(loss_steps, 1, axis=0)
    in_window = (rows <= i) & (rows > i - k)
    n_increased = jnp.sum(increased & in_window, axis=0)
    oscillating = n_increased <= k * rho
    stalled = (~s["reduced_last_check"]) & (s["loss_best_last_check"]
                                            >= loss_best)
    halve = is_checkpoint[i] & (oscillating | stalled)
    return dict(x_adv=jnp.where(ex(halve), x_best, x_new),
                x_adv_old=s["x_adv"],
                grad=jnp.where(ex(halve), grad_best, grad),
                x_best=x_best,
                grad_best=grad_best,
                x_best_adv=x_best_adv,
                loss_best=loss_best,
                robust=s["robust"] & correct,
                step=jnp.where(halve, s["step"] / 2, s["step"]),
                loss_steps=loss_steps,
                loss_best_last_check=jnp.where(is_checkpoint[i], loss_best,
                                               s["loss_best_last_check"]),
                reduced_last_check=jnp.where(is_checkpoint[i], halve,
                                             s["reduced_last_check"]))

  s = jax.lax.fori_loop(0, n_iter, body, state)
  return s["x_best"], s["robust"], s["loss_best"], s["x_best_adv"]


def perturb(model: Callable,
            loss_fn: Callable,
            key,
            x: jax.Array,
            *,
            eps,
            n_iter: int,
            delta_mask_fn: Optional[Callable] = None) -> jax.Array:
  """APGD as the training attack (`attack.name="apgd"`): one L-inf run of
  `single_run`, the evaluation's iteration (step 2 * eps halving at the
  checkpoints, momentum 0.75), returning its highest-loss point.

  Args:
    model: `model(x, key) -> logits`, the key the iteration's (ARD).
    loss_fn: `loss_fn(logits) -> [B]` to maximise: the objective's own inner
      loss per example (CE for AT and MART, the KL for TRADES).
    key: PRNG key, used as `single_run` uses it.
    x: clean images [B, H, W, C] in [0, 1].
    eps: L-inf radius (a traced value under the epsilon warm-up).
    n_iter: iterations (`attack.steps`), a Python int.
    delta_mask_fn: PRM, `mask_fn(key) -> mask`, as in `single_run`.

  Returns:
    The highest-loss iterate (`x_best`; not the evaluation's "first
    misclassified" point: training wants the loss maximised), gradients
    stopped.
  """
  # The labels only feed the misclassification bookkeeping, unused here.
  labels = jnp.zeros(x.shape[:1], jnp.int32)
  x_best, _, _, _ = single_run(model,
                               loss_fn,
                               key,
                               x,
                               labels,
                               eps=eps,
                               norm="Linf",
                               n_iter=n_iter,
                               delta_mask_fn=delta_mask_fn)
  return jax.lax.stop_gradient(x_best)


def _clean_correct(model, key, x, y):
  return jnp.argmax(model(x, key), axis=-1) == y


def _keep_broken(carry, x_best_adv, still_robust):
  """Records the examples a run broke that no earlier run had broken."""
  adv, robust = carry
  broken = robust & ~still_robust
  adv = jnp.where(_per_example(broken, adv), x_best_adv, adv)
  return adv, robust & ~broken


def apgd(logits_fn: Callable,
         key,
         images: jax.Array,
         labels: jax.Array,
         *,
         eps: float = 8 / 255,
         norm: str = "Linf",
         n_iter: int = 100,
         n_restarts: int = 1,
         loss: str = "ce",
         eot_iter: int = 1,
         rho: float = 0.75,
         stochastic: bool = False) -> jax.Array:
  """APGD-CE (loss="ce") or APGD-DLR (loss="dlr"), untargeted.

  Args:
    logits_fn: `logits_fn(x) -> logits`, or `logits_fn(x, key)` when
      `stochastic` (a randomised model; use eot_iter > 1 then).
    key: PRNG key; restart r uses `fold_in(key, r)`.
    images, labels: [B, H, W, C] in [0, 1] and integer labels [B].
    eps, norm: the threat model, "Linf" or "L2".
    n_iter, n_restarts, eot_iter, rho: the reference's parameters.

  Returns:
    Adversarial images (clean images where no adversarial example was
    found), gradients stopped.
  """
  check_apgd_args(eps, norm, n_iter, n_restarts, eot_iter)
  if loss not in UNTARGETED_LOSSES:
    raise UserError(f"unknown APGD loss {loss!r}: use 'ce' or 'dlr' (APGD-T "
                    "is apgd_targeted)")
  model = keyed(logits_fn, stochastic)
  x, y = images, labels.astype(jnp.int32)
  loss_fn = lambda logits: UNTARGETED_LOSSES[loss](logits, y)
  clean_key, run_key = jax.random.split(key)

  def restart(r, carry):
    _, still_robust, _, x_best_adv = single_run(model,
                                                loss_fn,
                                                jax.random.fold_in(run_key, r),
                                                x,
                                                y,
                                                eps=eps,
                                                norm=norm,
                                                n_iter=n_iter,
                                                eot_iter=eot_iter,
                                                rho=rho)
    return _keep_broken(carry, x_best_adv, still_robust)

  carry = (x, _clean_correct(model, clean_key, x, y))
  adv, _ = jax.lax.fori_loop(0, n_restarts, restart, carry)
  return jax.lax.stop_gradient(adv)


def apgd_targeted(logits_fn: Callable,
                  key,
                  images: jax.Array,
                  labels: jax.Array,
                  *,
                  eps: float = 8 / 255,
                  norm: str = "Linf",
                  n_iter: int = 100,
                  n_restarts: int = 1,
                  n_target_classes: int = 9,
                  eot_iter: int = 1,
                  rho: float = 0.75,
                  stochastic: bool = False) -> jax.Array:
  """APGD-T: APGD on the targeted DLR loss, for each of the top targets.

  Target t (t = 0 .. n_target_classes - 1) is the class with the (t + 2)-th
  largest clean logit; each target gets `n_restarts` runs, run r of target t
  keyed by `fold_in(key, t * n_restarts + r)`. Arguments as in `apgd`.
  """
  check_apgd_args(eps, norm, n_iter, n_restarts, eot_iter)
  model = keyed(logits_fn, stochastic)
  x, y = images, labels.astype(jnp.int32)
  clean_key, run_key = jax.random.split(key)
  clean_logits = model(x, clean_key)
  num_classes = clean_logits.shape[-1]
  if n_target_classes < 1 or n_target_classes + 1 > num_classes:
    raise UserError(f"APGD-T with n_target_classes={n_target_classes} needs "
                    f"at least {n_target_classes + 1} classes; the model has "
                    f"{num_classes}: lower n_target_classes")
  if num_classes < 4:
    raise UserError(f"the targeted DLR loss needs at least 4 classes; the "
                    f"model has {num_classes}: use apgd(loss='ce') instead")
  order = jnp.argsort(clean_logits, axis=-1)

  def run(j, carry):
    target_index = j // n_restarts
    targets = jnp.take(order, num_classes - 2 - target_index, axis=-1)
    loss_fn = lambda logits: dlr_loss_targeted(logits, y, targets)
    _, still_robust, _, x_best_adv = single_run(model,
                                                loss_fn,
                                                jax.random.fold_in(run_key, j),
                                                x,
                                                y,
                                                eps=eps,
                                                norm=norm,
                                                n_iter=n_iter,
                                                eot_iter=eot_iter,
                                                rho=rho)
    return _keep_broken(carry, x_best_adv, still_robust)

  carry = (x, jnp.argmax(clean_logits, axis=-1) == y)
  adv, _ = jax.lax.fori_loop(0, n_target_classes * n_restarts, run, carry)
  return jax.lax.stop_gradient(adv)

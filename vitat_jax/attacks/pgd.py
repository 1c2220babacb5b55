"""L-inf PGD: the training attack (with PRM/ARD) and evaluation PGD-k / CW-k.

Attacks work in pixel space: images in [0, 1], eps and alpha in the same
units (8/255, 2/255). Each attack is a pure function whose loop is a
`lax.fori_loop`, with the key of iteration i derived as `fold_in(key, i)`;
callers jit them (the training step jits the whole step, attack included).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vitat_jax.errors import UserError

LogitsFn = Callable[[jax.Array], jax.Array]

# The reference's CW loss floors the margin at -10.
CW_MARGIN_FLOOR = 10.0


def check_budget(eps: float, alpha: float, steps: int):
  """One-line errors for an attack budget that makes no sense."""
  if not 0 < eps <= 1:
    raise UserError(f"eps={eps} must be in (0, 1] (pixel units: 8/255 is "
                    f"{8 / 255:.4f})")
  if not 0 < alpha <= eps:
    raise UserError(f"alpha={alpha} must be in (0, eps={eps}]: the step size "
                    "cannot exceed the radius")
  if steps <= 0:
    raise UserError(f"attack steps={steps} must be a positive integer")


def project(x: jax.Array, delta: jax.Array, eps: float) -> jax.Array:
  """Onto the eps-ball, then onto the box: x + delta in [0, 1]."""
  delta = jnp.clip(delta, -eps, eps)
  return jnp.clip(delta, -x, 1.0 - x)


def uniform_init(key, x: jax.Array, eps: float) -> jax.Array:
  """delta ~ U(-eps, eps), clipped so that x + delta lies in [0, 1]."""
  delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  return jnp.clip(delta, -x, 1.0 - x)


def gaussian_init(key, x: jax.Array, scale=0.001) -> jax.Array:
  """delta = scale * N(0, 1), clipped to the box (TRADES' and MART's start).

  `scale` is a float or one value per channel (0.001 * std puts the
  reference's normalised-unit start into pixels).
  """
  delta = scale * jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(delta, -x, 1.0 - x)


def cross_entropy_per_example(logits: jax.Array,
                              labels: jax.Array) -> jax.Array:
  """CE with integer labels, one value per example."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def cw_margin_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """max(max_{j != y} z_j - z_y, -10): the reference's CW loss."""
  logits = logits.astype(jnp.float32)
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                     -jnp.inf, logits)
  return jnp.maximum(others.max(axis=-1) - true, -CW_MARGIN_FLOOR)


EVAL_LOSSES = {"ce": cross_entropy_per_example, "cw": cw_margin_per_example}


def perturb(
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    key,
    x: jax.Array,
    *,
    eps: float,
    alpha: float,
    steps: int,
    init: str = "uniform",
    gaussian_scale=0.001,
    delta_mask_fn: Optional[Callable[[jax.Array],
                                     jax.Array]] = None) -> jax.Array:
  """The training attack: `steps` sign-gradient ascent steps on `objective`.

  Args:
    objective: `objective(x_adv, key) -> scalar` to maximise; the key is the
      iteration's own (used for ARD keep-masks).
    key: PRNG key; split into the start and the loop, iteration i uses
      `fold_in(loop_key, i)`.
    x: clean images [B, H, W, C] in [0, 1].
    eps, alpha, steps: L-inf radius, step size and number of steps.
    init: "uniform" (PGD-AT) or "gaussian" (TRADES / MART,
      `gaussian_scale` * N(0, 1); a float or one value per channel).
    delta_mask_fn: PRM: `mask_fn(key) -> mask` broadcastable to x. The
      current perturbation is multiplied by a fresh mask before every forward
      pass; the sign step uses the gradient at that masked perturbation (as
      the reference does), and the returned perturbation is the one after
      the last update, not masked again.

  Returns:
    Adversarial images, with gradients stopped.
  """
  init_key, loop_key = jax.random.split(key)
  if init == "uniform":
    delta = uniform_init(init_key, x, eps)
  elif init == "gaussian":
    delta = gaussian_init(init_key, x, gaussian_scale)
  else:
    raise UserError(
        f"unknown attack init {init!r}: use 'uniform' or 'gaussian'")

  def body(i, delta):
    mask_key, objective_key = jax.random.split(jax.random.fold_in(loop_key, i))
    if delta_mask_fn is not None:
      delta = delta * delta_mask_fn(mask_key)
    grad = jax.grad(lambda d: objective(x + d, objective_key))(delta)
    return project(x, delta + alpha * jnp.sign(grad), eps)

  delta = jax.lax.fori_loop(0, steps, body, delta)
  return jax.lax.stop_gradient(jnp.clip(x + delta, 0.0, 1.0))


def pgd(logits_fn: LogitsFn,
        key,
        images: jax.Array,
        labels: jax.Array,
        *,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 20,
        restarts: int = 1,
        loss: str = "ce") -> jax.Array:
  """Evaluation PGD-k (loss="ce") or CW-k (loss="cw") with restarts.

  As in the reference evaluation: a uniform random start in the eps-ball;
  in every iteration only the examples still classified correctly take a
  step; across restarts the perturbation with the largest per-example loss
  is kept (ties go to the later restart).

  Returns:
    Adversarial images in [0, 1] within eps of `images`, gradients stopped.
  """
  if loss not in EVAL_LOSSES:
    raise UserError(f"unknown attack loss {loss!r}: use one of "
                    f"{', '.join(EVAL_LOSSES)}")
  if restarts <= 0:
    raise UserError(f"restarts={restarts} must be a positive integer")
  per_example_loss = EVAL_LOSSES[loss]
  x = images
  labels = labels.astype(jnp.int32)

  def total_loss(delta):
    logits = logits_fn(x + delta)
    return per_example_loss(logits, labels).sum(), logits

  def one_restart(restart_key):

    def body(i, delta):
      grad, logits = jax.grad(total_loss, has_aux=True)(delta)
      still_correct = jnp.argmax(logits, axis=-1) == labels
      stepped = project(x, delta + alpha * jnp.sign(grad), eps)
      return jnp.where(still_correct[:, None, None, None], stepped, delta)

    delta = jax.lax.fori_loop(0, steps, body, uniform_init(restart_key, x, eps))
    return delta, per_example_loss(logits_fn(x + delta), labels)

  def restart_body(r, carry):
    best_delta, best_loss = carry
    delta, final_loss = one_restart(jax.random.fold_in(key, r))
    better = final_loss >= best_loss
    best_delta = jnp.where(better[:, None, None, None], delta, best_delta)
    return best_delta, jnp.maximum(best_loss, final_loss)

  carry = (jnp.zeros_like(x), jnp.full(labels.shape, -jnp.inf, jnp.float32))
  best_delta, _ = jax.lax.fori_loop(0, restarts, restart_body, carry)
  return jax.lax.stop_gradient(jnp.clip(x + best_delta, 0.0, 1.0))


def cw(logits_fn: LogitsFn, key, images, labels, **kwargs) -> jax.Array:
  """CW-k: `pgd` with the margin loss."""
  return pgd(logits_fn, key, images, labels, loss="cw", **kwargs)

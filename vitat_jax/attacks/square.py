"""Square attack (Andriushchenko et al., ECCV 2020), L-inf, score based.

Follows the reference AutoAttack implementation (fra31/auto-attack,
square.py, with AutoAttack's settings): start from random vertical stripes
of +-eps, then each query perturbs one random square window of side
s = round(sqrt(p * H * W)) with +-2 eps per channel and keeps the change when
the margin loss z_y - max_{j != y} z_j decreases (or the point becomes
misclassified). p starts at p_init = 0.8 and halves at queries 10, 50, 200,
500, 1000, 2000, 4000, 6000 and 8000. One difference: the reference draws
one window for the whole batch each query; here every example draws its own
(the original paper's per-example attack), so an example's attack does not
depend on the rest of its batch. The queries are a `lax.while_loop` that
stops when every example is misclassified; `run_queries` runs a segment of
them, so AutoAttack can drop the broken examples between segments.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError

# Query indices after which the reference halves p (its p_selection).
_P_HALVING_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(n_queries: int, p_init: float = 0.8) -> np.ndarray:
  """p at every query index, as the reference's `p_selection` (no rescale)."""
  it = np.arange(n_queries)
  halvings = sum((it > q).astype(np.int64) for q in _P_HALVING_QUERIES)
  return p_init / 2.0**halvings


def window_sizes(n_queries: int, p_init: float, height: int,
                 width: int) -> np.ndarray:
  """The square side at every query, computed on the host in float64 so
  the rounding is the reference's."""
  sizes = [
      min(max(int(round(np.sqrt(p * height * width))), 1), min(height, width))
      for p in p_schedule(n_queries, p_init)
  ]
  return np.asarray(sizes, np.int32)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{j != y} z_j: negative exactly when misclassified."""
  logits = logits.astype(jnp.float32)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                     -jnp.inf, logits)
  return z_y - others.max(axis=-1)


def _random_sign(key, shape):
  return jnp.sign(2.0 * jax.random.uniform(key, shape) - 1.0)


def start_state(logits_fn: Callable, key, x: jax.Array, y: jax.Array, *,
                eps: float):
  """Square's start (random vertical stripes of +-eps): the state
  (x_best, margin_best, loss_best) that `run_queries` continues."""
  batch, _, width, channels = x.shape
  start_key, _ = jax.random.split(key)
  x_best = jnp.clip(
      x + eps * _random_sign(start_key, (batch, 1, width, channels)), 0.0, 1.0)
  margin_best = margin(logits_fn(x_best), y)
  return x_best, margin_best, margin_best


def run_queries(logits_fn: Callable, key, x: jax.Array, y: jax.Array, state,
                first, last, *, eps: float, n_queries: int, p_init: float):
  """Queries first .. last - 1 (traced or not) of a run of n_queries from
  `state`; stops early when every example is misclassified. Running a run
  in segments gives the same result as running it at once (query i draws
  from `fold_in(., i)`), so a caller can drop broken examples in between."""
  batch, height, width, channels = x.shape
  sizes = jnp.asarray(window_sizes(n_queries, p_init, height, width))
  _, loop_key = jax.random.split(key)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  def cond(carry):
    i, _, margin_best, _ = carry
    return (i < last) & jnp.any(margin_best > 0)

  def body(carry):
    i, x_best, margin_best, loss_best = carry
    row_key, col_key, sign_key = jax.random.split(
        jax.random.fold_in(loop_key, i), 3)
    s = sizes[i]
    # The reference's random_int(0, h - s): floor(u * (h - s)).
    top = jnp.floor(jax.random.uniform(row_key, (batch,)) * (height - s))
    left = jnp.floor(jax.random.uniform(col_key, (batch,)) * (width - s))
    top = top.astype(jnp.int32)[:, None, None, None]
    left = left.astype(jnp.int32)[:, None, None, None]
    window = ((rows >= top) & (rows < top + s) & (cols >= left) &
              (cols < left + s))
    signs = _random_sign(sign_key, (batch, 1, 1, channels))
    x_new = x_best + jnp.where(window, 2.0 * eps * signs, 0.0)
    x_new = jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
    margin_new = margin(logits_fn(x_new), y)

    active = margin_best > 0
    improved = margin_new < loss_best
    loss_best = jnp.where(active & improved, margin_new, loss_best)
    accept = active & (improved | (margin_new <= 0))
    margin_best = jnp.where(accept, margin_new, margin_best)
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    return i + 1, x_best, margin_best, loss_best

  carry = (jnp.asarray(first, jnp.int32), *state)
  _, x_best, margin_best, loss_best = jax.lax.while_loop(cond, body, carry)
  return x_best, margin_best, loss_best


def single_run(logits_fn: Callable, key, x: jax.Array, y: jax.Array, *,
               eps: float, n_queries: int, p_init: float):
  """One Square run; returns (x_best, margin_best)."""
  state = start_state(logits_fn, key, x, y, eps=eps)
  x_best, margin_best, _ = run_queries(logits_fn,
                                       key,
                                       x,
                                       y,
                                       state,
                                       0,
                                       n_queries,
                                       eps=eps,
                                       n_queries=n_queries,
                                       p_init=p_init)
  return x_best, margin_best


def square(logits_fn: Callable,
           key,
           images: jax.Array,
           labels: jax.Array,
           *,
           eps: float = 8 / 255,
           n_queries: int = 5000,
           p_init: float = 0.8,
           n_restarts: int = 1) -> jax.Array:
  """Square attack, L-inf, untargeted margin loss.

  Args:
    logits_fn: `logits_fn(x) -> logits` (only its outputs are used).
    key: PRNG key; restart r uses `fold_in(key, r)`, query i of a restart
      `fold_in(., i)`.
    images, labels: [B, H, W, C] in [0, 1] and integer labels [B].
    eps, n_queries, p_init, n_restarts: the reference's parameters.

  Returns:
    Adversarial images (clean images where no adversarial example was
    found), gradients stopped.
  """
  if not 0 < eps:
    raise UserError(f"Square eps={eps} must be positive")
  if n_queries <= 0 or n_restarts <= 0:
    raise UserError(f"Square n_queries={n_queries} and n_restarts="
                    f"{n_restarts} must be positive integers")
  if not 0 < p_init <= 1:
    raise UserError(f"Square p_init={p_init} must be in (0, 1]")
  x, y = images, labels.astype(jnp.int32)

  def restart(r, carry):
    adv, robust = carry
    x_best, _ = single_run(logits_fn,
                           jax.random.fold_in(key, r),
                           x,
                           y,
                           eps=eps,
                           n_queries=n_queries,
                           p_init=p_init)
    broken = robust & (jnp.argmax(logits_fn(x_best), axis=-1) != y)
    adv = jnp.where(broken[:, None, None, None], x_best, adv)
    return adv, robust & ~broken

  carry = (x, jnp.argmax(logits_fn(x), axis=-1) == y)
  adv, _ = jax.lax.fori_loop(0, n_restarts, restart, carry)
  return jax.lax.stop_gradient(adv)

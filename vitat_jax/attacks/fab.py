"""FAB (Croce & Hein, ICML 2020), L-inf: FAB-T (targeted) and untargeted FAB.

Follows the reference implementation (fra31/auto-attack, fab_base.py,
fab_pt.py, fab_projections.py) with AutoAttack's defaults: 100 iterations,
alpha_max 0.1, eta 1.05, beta 0.9. Each iteration linearises the decision
boundary at the current point (the hyperplane of the target's logit
difference for FAB-T, of the closest class for FAB), projects both the
current point and the clean point onto it (the exact L-inf projection onto
a hyperplane intersected with the box), steps to a convex combination of the
two (extrapolated by eta), and, once misclassified, records the point if it
is the closest so far and steps back towards the clean image by beta. A point
found counts only if it lies within eps. The first run of a target starts at
the clean image, later ones at a random point of half radius (the
reference's `use_rand_start=(counter > 0)`).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from vitat_jax.errors import UserError

_NOT_FOUND = 1e10

# Bisection steps of the projection: the bracket shrinks to 2^-32 of the
# largest move, below float32 resolution, before the exact last step.
_BISECTION_STEPS = 32


def projection_linf(points: jax.Array, w: jax.Array, b: jax.Array):
  """Smallest L-inf step d with <w, points + d> = b and points + d in [0, 1].

  Rows are independent: points and w are [N, D], b is [N]. The same map as
  the reference's `projection_linf` (fab_projections.py), computed without
  its sort: with radius lam, coordinate i can move the product by at most
  |w_i| min(lam, p_i) (p_i: its distance to the box side that lowers the
  gap), so the answer is the root lam* of the concave piecewise-linear
  g(lam) = sum_i |w_i| min(lam, p_i) = |gap|, and d_i moves coordinate i by
  min(lam*, p_i) towards that side. If even the box corner (lam = max p) does
  not reach the hyperplane, d is the step to the corner, as in the reference.
  A fixed-length bisection brackets lam*, then one exact linear solve on the
  bracket's segment: O(N D) work per step instead of an O(N D log D) sort,
  which XLA runs slowly on CPU.
  """
  t = points
  gap = jnp.sum(w * t, axis=1) - b
  # Step direction per coordinate: against sign(w) * sign(gap).
  direction = -jnp.sign(w) * jnp.where(gap >= 0, 1.0, -1.0)[:, None]
  room = jnp.where(direction > 0, 1.0 - t, t)  # p_i
  weight = jnp.abs(w)
  need = jnp.abs(gap)

  def reach(lam):
    return jnp.sum(weight * jnp.minimum(lam[:, None], room), axis=1)

  hi = jnp.max(jnp.where(weight > 0, room, 0.0), axis=1)
  reachable = need < reach(hi)

  def bisect(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    below = reach(mid) < need
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect,
                             (jnp.zeros_like(hi), hi))
  # On [lo, hi] (up to float resolution) the coordinates with room <= lo are
  # saturated and the others move by lam: solve that linear piece exactly.
  free = room > lo[:, None]
  saturated = jnp.sum(jnp.where(free, 0.0, weight * room), axis=1)
  slope = jnp.sum(jnp.where(free, weight, 0.0), axis=1)
  lam = (need - saturated) / jnp.where(slope > 0, slope, 1.0)
  lam = jnp.where(reachable, jnp.clip(lam, lo, hi), jnp.inf)
  d = direction * jnp.minimum(lam[:, None], room)
  return jnp.where(weight > 0, d, 0.0)


def _linf(v):
  return jnp.max(jnp.abs(v).reshape(v.shape[0], -1), axis=-1)


def _ex(v, like):
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def targeted_hyperplane(logits_fn, targets):
  """f = z_t - z_y and its gradient: FAB-T's one hyperplane."""

  def fn(x1, y):

    def diff(x_in):
      logits = logits_fn(x_in).astype(jnp.float32)
      z = lambda c: jnp.take_along_axis(logits, c[:, None], axis=-1)[:, 0]
      return z(targets) - z(y)

    f, vjp = jax.vjp(diff, x1)
    (g,) = vjp(jnp.ones_like(f))
    return f, g

  return fn


def closest_hyperplane(logits_fn):
  """Untargeted FAB: of all z_j - z_y, the one closest in L-inf (|f| / |g|_1)."""

  def fn(x1, y):
    logits_of = lambda x_in: logits_fn(x_in).astype(jnp.float32)
    logits, vjp = jax.vjp(logits_of, x1)
    num_classes = logits.shape[-1]
    (jac,) = jax.vmap(vjp)(jnp.eye(num_classes, dtype=logits.dtype)[:, None] *
                           jnp.ones_like(logits)[None])
    jac = jnp.moveaxis(jac, 0, 1)  # [B, K, ...]
    take = lambda v, c: jnp.take_along_axis(
        v, c.reshape((-1, 1) + (1,) * (v.ndim - 2)), axis=1)
    df = logits - take(logits, y)
    dg = jac - take(jac, y)
    df = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), _NOT_FOUND, df)
    dist = jnp.abs(df) / (
        1e-12 + jnp.sum(jnp.abs(dg).reshape(dg.shape[:2] + (-1,)), axis=-1))
    closest = jnp.argmin(dist, axis=1)
    return take(df, closest)[:, 0], take(dg, closest)[:, 0]

  return fn


def single_run(logits_fn: Callable, hyperplane_fn: Callable, key, x: jax.Array,
               y: jax.Array, *, eps: float, n_iter: int, alpha_max: float,
               eta: float, beta: float, random_start) -> jax.Array:
  """One FAB run; returns the closest adversarial point found (or x)."""
  batch = x.shape[0]
  flat = lambda v: v.reshape(batch, -1)
  t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  x_rand = jnp.clip(x + eps * t / _ex(_linf(t), x) * 0.5, 0.0, 1.0)
  x1 = jnp.where(random_start, x_rand, x)

  def body(_, state):
    x1, adv, best_dist = state
    f, g = hyperplane_fn(x1, y)
    w = flat(g)
    b = -f + jnp.sum(w * flat(x1), axis=-1)
    d3 = projection_linf(jnp.concatenate([flat(x1), flat(x)]),
                         jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    d1, d2 = d3[:batch].reshape(x.shape), d3[batch:].reshape(x.shape)
    a0 = jnp.maximum(jnp.max(jnp.abs(d3), axis=1), 1e-8)
    a1, a2 = a0[:batch], a0[batch:]
    alpha = _ex(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x)
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + d2 * eta) * alpha, 0.0,
                  1.0)
    is_adv = jnp.argmax(logits_fn(x1), axis=-1) != y
    dist = _linf(x1 - x)
    closer = is_adv & (dist < best_dist)
    adv = jnp.where(_ex(closer, x), x1, adv)
    best_dist = jnp.where(closer, dist, best_dist)
    x1 = jnp.where(_ex(is_adv, x), x + (x1 - x) * beta, x1)
    return x1, adv, best_dist

  state = (x1, x, jnp.full((batch,), _NOT_FOUND, jnp.float32))
  _, adv, _ = jax.lax.fori_loop(0, n_iter, body, state)
  return adv


def _check(eps, n_iter, n_restarts):
  if not 0 < eps:
    raise UserError(f"FAB eps={eps} must be positive")
  if n_iter <= 0 or n_restarts <= 0:
    raise UserError(f"FAB n_iter={n_iter} and n_restarts={n_restarts} must be "
                    "positive integers")


def _keep_if_within_eps(logits_fn, carry, adv_run, x, y, eps):
  adv, robust = carry
  broken = robust & (jnp.argmax(logits_fn(adv_run), axis=-1)
                     != y) & (_linf(adv_run - x) <= eps)
  adv = jnp.where(_ex(broken, x), adv_run, adv)
  return adv, robust & ~broken


def fab_targeted(logits_fn: Callable,
                 key,
                 images: jax.Array,
                 labels: jax.Array,
                 *,
                 eps: float = 8 / 255,
                 n_iter: int = 100,
                 n_restarts: int = 1,
                 n_target_classes: int = 9,
                 alpha_max: float = 0.1,
                 eta: float = 1.05,
                 beta: float = 0.9) -> jax.Array:
  """FAB-T, L-inf: for each of the top `n_target_classes` targets (the
  classes with the 2nd, 3rd, ... largest clean logit), `n_restarts` runs.

  Returns adversarial images within eps (clean images where none was found),
  gradients stopped. Run r of target t is keyed by
  `fold_in(key, t * n_restarts + r)`.
  """
  _check(eps, n_iter, n_restarts)
  x, y = images, labels.astype(jnp.int32)
  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  if n_target_classes < 1 or n_target_classes + 1 > num_classes:
    raise UserError(f"FAB-T with n_target_classes={n_target_classes} needs at "
                    f"least {n_target_classes + 1} classes; the model has "
                    f"{num_classes}: lower n_target_classes")
  order = jnp.argsort(clean_logits, axis=-1)

  def run(j, carry):
    targets = jnp.take(order, num_classes - 2 - j // n_restarts, axis=-1)
    adv_run = single_run(logits_fn,
                         targeted_hyperplane(logits_fn, targets),
                         jax.random.fold_in(key, j),
                         x,
                         y,
                         eps=eps,
                         n_iter=n_iter,
                         alpha_max=alpha_max,
                         eta=eta,
                         beta=beta,
                         random_start=j % n_restarts > 0)
    return _keep_if_within_eps(logits_fn, carry, adv_run, x, y, eps)

  carry = (x, jnp.argmax(clean_logits, axis=-1) == y)
  adv, _ = jax.lax.fori_loop(0, n_target_classes * n_restarts, run, carry)
  return jax.lax.stop_gradient(adv)


def fab(logits_fn: Callable,
        key,
        images: jax.Array,
        labels: jax.Array,
        *,
        eps: float = 8 / 255,
        n_iter: int = 100,
        n_restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9) -> jax.Array:
  """Untargeted FAB, L-inf (the `plus` version's "fab"). Needs the full
  Jacobian each iteration (one backward pass per class)."""
  _check(eps, n_iter, n_restarts)
  x, y = images, labels.astype(jnp.int32)
  hyperplane_fn = closest_hyperplane(logits_fn)

  def run(r, carry):
    adv_run = single_run(logits_fn,
                         hyperplane_fn,
                         jax.random.fold_in(key, r),
                         x,
                         y,
                         eps=eps,
                         n_iter=n_iter,
                         alpha_max=alpha_max,
                         eta=eta,
                         beta=beta,
                         random_start=r > 0)
    return _keep_if_within_eps(logits_fn, carry, adv_run, x, y, eps)

  carry = (x, jnp.argmax(logits_fn(x), axis=-1) == y)
  adv, _ = jax.lax.fori_loop(0, n_restarts, run, carry)
  return jax.lax.stop_gradient(adv)

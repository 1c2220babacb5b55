"""AutoAttack (Croce & Hein, ICML 2020): the ensemble and its sanity checks.

As the reference (fra31/auto-attack, autoattack.py): the attacks run in
sequence, each only on the points that every earlier attack left robust, and
the robust accuracy is reported after each. Versions:

  standard  APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000)
  plus      APGD-CE and APGD-DLR (5 restarts), FAB (5 restarts), Square,
            APGD-T, FAB-T
  rand      APGD-CE and APGD-DLR with EOT over 20 draws (randomised models)
  custom    `attacks_to_run`, with the reference's constructor settings

The host loop gathers the still-robust points into fixed-shape batches (the
last one padded to a power of two, so each attack compiles a few times at
most); each attack on a batch is one jitted function. Attack `name` uses the
key `fold_in(key, ATTACK_NAMES.index(name))`, its b-th batch
`fold_in(that, b)`, so the same key gives the same result.

Over several processes (`jax.distributed`), process p attacks the batches
b with b % process_count == p on one of its devices, and the processes
merge the still-robust flags and adversarial images after every attack:
the batches and their keys are those of a single process, so is the result.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

# Names, not modules: the package exports functions named apgd, fab, square.
from vitat_jax.attacks.apgd import apgd
from vitat_jax.attacks.apgd import apgd_targeted
from vitat_jax.attacks.apgd import dlr_loss
from vitat_jax.attacks.fab import fab
from vitat_jax.attacks.fab import fab_targeted
from vitat_jax.attacks.pgd import cross_entropy_per_example
from vitat_jax.attacks.square import square
from vitat_jax import parallel
from vitat_jax.errors import UserError

ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
WHITE_BOX = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")
# The reference's thresholds for its checks.
SQUARE_MARGIN = 0.002
PROBABILITY_TOLERANCE = 1e-5
RANDOMIZED_TOLERANCE = 1e-4
RANDOMIZED_PASSES = 5


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """One attack's parameters; hashable, so a static argument of `jit`."""
  name: str
  eps: float
  norm: str = "Linf"
  n_iter: int = 100
  n_restarts: int = 1
  n_target_classes: int = 9
  eot_iter: int = 1
  n_queries: int = 5000


def attack_settings(version: str, eps: float, norm: str = "Linf",
                    attacks_to_run: Optional[Sequence[str]] = None,
                    overrides: Optional[Dict[str, Dict[str, int]]] = None
                    ) -> List[AttackSettings]:
  """The reference's `_set_version` (or constructor defaults for custom),
  then `overrides`, e.g. {"square": {"n_queries": 1000}}."""
  unknown = set(overrides or {}) - set(ATTACK_NAMES)
  if unknown:
    raise UserError(f"overrides for unknown attacks {sorted(unknown)}: use "
                    f"names from {', '.join(ATTACK_NAMES)}")
  if version not in (*VERSIONS, "custom"):
    raise UserError(f"unknown AutoAttack version {version!r}: use one of "
                    f"{', '.join((*VERSIONS, 'custom'))}")
  if version == "custom":
    if not attacks_to_run:
      raise UserError("version='custom' needs attacks_to_run, e.g. "
                      "['apgd-ce', 'square']")
    names = tuple(attacks_to_run)
  elif attacks_to_run is not None:
    raise UserError(f"attacks_to_run is only used with version='custom' "
                    f"(version={version!r} fixes its own attacks)")
  else:
    names = VERSIONS[version]
  unknown = [n for n in names if n not in ATTACK_NAMES]
  if unknown or len(set(names)) != len(names):
    raise UserError(f"bad attacks_to_run {list(names)}: use each of "
                    f"{', '.join(ATTACK_NAMES)} at most once")
  if norm not in ("Linf", "L2"):
    raise UserError(f"unknown AutoAttack norm {norm!r}: use 'Linf' or 'L2'")
  if norm != "Linf" and any(n.startswith(("fab", "square")) for n in names):
    raise UserError(f"FAB and Square are implemented for L-inf only; with "
                    f"norm={norm!r} use version='custom' with APGD attacks")
  if not 0 < eps <= 1 and norm == "Linf":
    raise UserError(f"eps={eps} must be in (0, 1] (pixel units: 8/255 is "
                    f"{8 / 255:.4f})")

  # Reference constructor defaults; the versions then override some.
  restarts = {"apgd-ce": 5, "apgd-dlr": 5, "fab": 5, "apgd-t": 1, "fab-t": 1,
              "square": 1}
  eot = 1
  if version == "standard":
    restarts.update({"apgd-ce": 1, "apgd-dlr": 1, "fab": 1})
  elif version == "rand":
    restarts.update({"apgd-ce": 1, "apgd-dlr": 1})
    eot = 20
  settings = [AttackSettings(name=n, eps=eps, norm=norm,
                             n_restarts=restarts[n],
                             eot_iter=eot if n.startswith("apgd") else 1)
              for n in names]
  return [_override(s, (overrides or {}).get(s.name, {})) for s in settings]


def _override(settings: AttackSettings, changes: Dict[str, Any]):
  allowed = {f.name for f in dataclasses.fields(AttackSettings)} - {
      "name", "eps", "norm"}
  unknown = set(changes) - allowed
  if unknown:
    raise UserError(f"cannot override {sorted(unknown)} of {settings.name}: "
                    f"use {', '.join(sorted(allowed))}")
  for field, value in changes.items():
    if not isinstance(value, int) or value <= 0:
      raise UserError(f"override {settings.name}.{field}={value!r} must be a "
                      "positive integer")
  return dataclasses.replace(settings, **changes)


@dataclasses.dataclass(frozen=True)
class _Model:
  """Uniform `model(params, x, key)`; hashable by the wrapped function."""
  fn: Callable
  takes_params: bool
  stochastic: bool

  def __call__(self, params, x, key):
    args = (params, x) if self.takes_params else (x,)
    if self.stochastic:
      args += (key,)
    return self.fn(*args)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def _attack_batch(params, key, x, y, *, model: _Model,
                  settings: AttackSettings):
  """Runs one attack on a batch: (adversarial images, still correct)."""
  attack_key, check_key = jax.random.split(key)
  draw_key = jax.random.fold_in(check_key, 1)
  fixed = lambda xi: model(params, xi, draw_key)
  s = settings
  if s.name in ("apgd-ce", "apgd-dlr", "apgd-t"):
    logits_fn = ((lambda xi, k: model(params, xi, k)) if model.stochastic
                 else fixed)
    common = dict(eps=s.eps, norm=s.norm, n_iter=s.n_iter,
                  n_restarts=s.n_restarts, eot_iter=s.eot_iter,
                  stochastic=model.stochastic)
    if s.name == "apgd-t":
      adv = apgd_targeted(logits_fn, attack_key, x, y,
                                   n_target_classes=s.n_target_classes,
                                   **common)
    else:
      adv = apgd(logits_fn, attack_key, x, y, loss=s.name[5:],
                          **common)
  elif s.name == "fab-t":
    adv = fab_targeted(fixed, attack_key, x, y, eps=s.eps,
                               n_iter=s.n_iter, n_restarts=s.n_restarts,
                               n_target_classes=s.n_target_classes)
  elif s.name == "fab":
    adv = fab(fixed, attack_key, x, y, eps=s.eps, n_iter=s.n_iter,
                      n_restarts=s.n_restarts)
  else:
    adv = square(fixed, attack_key, x, y, eps=s.eps,
                            n_queries=s.n_queries, n_restarts=s.n_restarts)
  correct = jnp.argmax(model(params, adv, check_key), axis=-1) == y
  return adv, correct


@functools.partial(jax.jit, static_argnames=("model",))
def _clean_batch(params, key, x, y, *, model: _Model):
  """Clean correctness, and which points have an all-zero loss gradient.

  The gradient is that of the DLR loss (CE with fewer than 3 classes): DLR
  is invariant to the logits' scale, so it is zero only where the model is
  flat, not where a confident softmax underflows.
  """
  def loss(xi):
    logits = model(params, xi, key)
    per_example = (dlr_loss(logits, y) if logits.shape[-1] >= 3
                   else cross_entropy_per_example(logits, y))
    return per_example.sum(), logits
  grad, logits = jax.grad(loss, has_aux=True)(x)
  zero_grad = jnp.sum(jnp.abs(grad).reshape(x.shape[0], -1), axis=-1) == 0
  return jnp.argmax(logits, axis=-1) == y, zero_grad


@dataclasses.dataclass
class AutoAttackResult:
  """What `autoattack` found.

  Attributes:
    robust_accuracy: "clean", then each attack run, in order: the fraction
      of points still classified correctly after it (and every earlier one).
    adv_images: [N, H, W, C]: the adversarial example of every broken point,
      the clean image of every robust (or misclassified) one.
    robust: [N] bool: classified correctly after every attack.
    robust_after: attack name -> [N] bool, the robust set after it.
    checks: the sanity checks: `looks_like_probabilities`, `randomized`
      (None in the rand version), `zero_gradient_points` (a count),
      `square_beats_white_box` (None without Square after a white-box
      attack), `too_few_classes`.
    warnings: one line per failed check.
    seconds: wall-clock time per attack.
  """
  robust_accuracy: Dict[str, float]
  adv_images: np.ndarray
  robust: np.ndarray
  robust_after: Dict[str, np.ndarray]
  checks: Dict[str, Any]
  warnings: List[str]
  seconds: Dict[str, float]

  @property
  def accuracy(self) -> float:
    return float(self.robust.mean())


# Remainders are padded to a power of two, at least this (or batch_size):
# smaller batches would cost a compile each and save nothing.
MIN_PADDED_BATCH = 64


def _chunks(indices: np.ndarray, batch_size: int):
  """Fixed-shape chunks of indices, padded (with the last index): every
  full chunk has batch_size entries, the last a power of two <= batch_size
  (and >= MIN_PADDED_BATCH). Yields (padded indices, number valid)."""
  floor = min(batch_size, MIN_PADDED_BATCH)
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    size = min(batch_size,
               max(floor, 1 << max(len(chunk) - 1, 0).bit_length()))
    yield np.pad(chunk, (0, size - len(chunk)), mode="edge"), len(chunk)


def _my_chunks(indices: np.ndarray, batch_size: int, owner: np.ndarray):
  """`enumerate(_chunks(...))`, only the batches of this process, recording
  in `owner` which process takes each point."""
  num_processes, me = jax.process_count(), jax.process_index()
  for b, (idx, valid) in enumerate(_chunks(indices, batch_size)):
    owner[idx[:valid]] = b % num_processes
    if b % num_processes == me:
      yield b, (idx, valid)


def _first_batch_checks(model, params, key, x, version, settings, warnings):
  """The reference's checks on the first batch (eager, un-jitted passes, so
  a logits_fn with hidden randomness shows it)."""
  checks = {}
  outputs = [np.asarray(model(params, jnp.asarray(x),
                              jax.random.fold_in(key, i)), np.float64)
             for i in range(RANDOMIZED_PASSES)]
  out = outputs[0]
  num_classes = out.shape[-1]
  checks["looks_like_probabilities"] = bool(
      out.max() < 1 + PROBABILITY_TOLERANCE
      and out.min() > -PROBABILITY_TOLERANCE
      and np.all(np.abs(out.sum(-1) - 1) < PROBABILITY_TOLERANCE))
  if checks["looks_like_probabilities"]:
    warnings.append("the outputs look like probabilities (in [0, 1], rows "
                    "summing to 1): pass logits, not softmax outputs")
  if version == "rand":
    checks["randomized"] = None
  else:
    unit = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10)
            for o in outputs]
    predictions = [o.argmax(-1) for o in outputs]
    max_diff = max(np.linalg.norm(a - b, axis=-1).max()
                   for i, a in enumerate(unit) for b in unit[i + 1:])
    checks["randomized"] = bool(
        max_diff > RANDOMIZED_TOLERANCE
        or any((p != predictions[0]).any() for p in predictions))
    if checks["randomized"]:
      warnings.append(f"{RANDOMIZED_PASSES} forward passes of the same images "
                      "differ: this looks like a randomised defence; use "
                      "version='rand'")
  names = [s.name for s in settings]
  needed = max([s.n_target_classes + 1 for s in settings
                if s.name in ("apgd-t", "fab-t")] + [0])
  too_few = (("apgd-dlr" in names or "apgd-t" in names) and num_classes <= 3
             ) or needed > num_classes
  checks["too_few_classes"] = bool(too_few)
  if too_few:
    raise UserError(f"the model has {num_classes} classes, too few for "
                    f"{', '.join(names)} (targeted attacks need "
                    f"n_target_classes + 1, DLR needs 4): use "
                    "version='custom' with apgd-ce, fab and square")
  return checks


def autoattack(logits_fn: Callable, images, labels, *, key,
               eps: float = 8 / 255, norm: str = "Linf",
               version: str = "standard",
               attacks_to_run: Optional[Sequence[str]] = None,
               batch_size: int = 250, params=None, stochastic: bool = False,
               overrides: Optional[Dict[str, Dict[str, int]]] = None,
               run_checks: bool = True, verbose: bool = True
               ) -> AutoAttackResult:
  """Runs AutoAttack on `images` [N, H, W, C] in [0, 1] with integer labels.

  Args:
    logits_fn: `logits_fn(x) -> logits`; `logits_fn(params, x)` when
      `params` is given (then each attack compiles once per logits_fn and
      shape, not once per call); with `stochastic` a final `key` argument
      (a randomised model, for version="rand").
    key: PRNG key; the whole evaluation is a function of it.
    eps, norm: the threat model.
    version: "standard", "plus", "rand" or "custom" (with attacks_to_run,
      names from ATTACK_NAMES).
    batch_size: points per attack batch.
    overrides: per-attack changes to the version's settings (plain data),
      e.g. {"square": {"n_queries": 1000}, "apgd-ce": {"n_restarts": 3}}.
    run_checks: the sanity checks on the first batch and the zero gradients.

  Returns:
    An AutoAttackResult.
  """
  settings = attack_settings(version, eps, norm, attacks_to_run,
                             overrides)
  x_all = np.asarray(images, np.float32)
  y_all = np.asarray(labels).astype(np.int32)
  if x_all.ndim != 4 or y_all.shape != x_all.shape[:1] or not len(x_all):
    raise UserError(f"autoattack needs images [N, H, W, C] and labels [N]; "
                    f"got {x_all.shape} and {y_all.shape}")
  if x_all.min() < 0 or x_all.max() > 1:
    raise UserError("autoattack needs images in [0, 1] (the model normalises "
                    "them itself)")
  if batch_size <= 0:
    raise UserError(f"batch_size={batch_size} must be a positive integer")
  model = _Model(logits_fn, params is not None, stochastic)
  params = parallel.single_device_copy(params)
  check_key, clean_key, attacks_key = jax.random.split(key, 3)
  warnings = []
  checks = {}
  if run_checks:
    checks = _first_batch_checks(model, params, check_key,
                                 x_all[:batch_size], version, settings,
                                 warnings)

  n = len(x_all)
  robust = np.zeros(n, bool)
  zero_grad = np.zeros(n, bool)
  owner = np.zeros(n, np.int32)  # the process that computed each point
  for b, (idx, valid) in _my_chunks(np.arange(n), batch_size, owner):
    correct, zero = _clean_batch(params, jax.random.fold_in(clean_key, b),
                                 x_all[idx], y_all[idx], model=model)
    robust[idx[:valid]] = np.asarray(correct)[:valid]
    zero_grad[idx[:valid]] = np.asarray(zero)[:valid]
  robust = parallel.merge_owned_rows(robust, owner)
  zero_grad = parallel.merge_owned_rows(zero_grad, owner)
  robust_accuracy = {"clean": float(robust.mean())}
  if run_checks:
    checks["zero_gradient_points"] = int((zero_grad & robust).sum())
    if checks["zero_gradient_points"]:
      warnings.append(f"{checks['zero_gradient_points']} correctly classified "
                      "points have a zero loss gradient: gradient-based "
                      "attacks are unreliable here (masked gradients?)")

  adv_all = x_all.copy()
  seconds = {}
  robust_after = {}
  for s in settings:
    start = time.perf_counter()
    attack_key = jax.random.fold_in(attacks_key, ATTACK_NAMES.index(s.name))
    todo = np.flatnonzero(robust)
    for b, (idx, valid) in _my_chunks(todo, batch_size, owner):
      adv, correct = _attack_batch(params, jax.random.fold_in(attack_key, b),
                                   x_all[idx], y_all[idx], model=model,
                                   settings=s)
      broken = ~np.asarray(correct)[:valid]
      adv_all[idx[:valid][broken]] = np.asarray(adv)[:valid][broken]
      robust[idx[:valid][broken]] = False
    robust = parallel.merge_owned_rows(robust, owner)
    adv_all = parallel.merge_owned_rows(adv_all, owner)
    seconds[s.name] = time.perf_counter() - start
    robust_accuracy[s.name] = float(robust.mean())
    robust_after[s.name] = robust.copy()
    if verbose:
      logging.info("robust accuracy after %s: %.2f%% (%d points, %.1f s)",
                   s.name.upper(), 100 * robust_accuracy[s.name], len(todo),
                   seconds[s.name])

  if run_checks:
    checks["square_beats_white_box"] = None
    if "square" in robust_accuracy and len(robust_accuracy) > 2:
      best_other = min(v for k, v in robust_accuracy.items() if k != "square")
      beaten = robust_accuracy["square"] < best_other - SQUARE_MARGIN
      checks["square_beats_white_box"] = bool(beaten)
      if beaten:
        warnings.append(
            f"Square lowered the robust accuracy by "
            f"{100 * (best_other - robust_accuracy['square']):.2f} pp after "
            "the white-box attacks: the evaluation may be unreliable "
            "(gradient masking?)")
  for line in warnings:
    logging.warning("autoattack: %s", line)
  return AutoAttackResult(robust_accuracy=robust_accuracy, adv_images=adv_all,
                          robust=robust, robust_after=robust_after,
                          checks=checks, warnings=warnings,
                          seconds=seconds)

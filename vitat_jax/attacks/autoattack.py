"""AutoAttack (Croce & Hein, ICML 2020): the ensemble and its sanity checks.

As the reference (fra31/auto-attack, autoattack.py): the attacks run in
sequence, each only on the points that every earlier attack left robust, and
the robust accuracy is reported after each. Versions:

  standard  APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000)
  plus      APGD-CE and APGD-DLR (5 restarts), FAB (5 restarts), Square,
            APGD-T, FAB-T
  rand      APGD-CE and APGD-DLR with EOT over 20 draws (randomised models)
  custom    `attacks_to_run`, with the reference's constructor settings

Work follows the robust set, as in the reference: before every stage of an
attack (each target of APGD-T and FAB-T, each restart) the host gathers the
points still robust into dense fixed-shape batches (full ones of
batch_size, the remainder padded to one of four sizes per octave: a few
compiles per attack), and Square drops its broken points between query segments
(SQUARE_SEGMENTS) instead of querying a whole padded batch until every
point in it is broken. Each batch is sharded over this process's devices
(mesh axis "data"), the params replicated.

Every point draws its own randomness: point i of attack `name` uses
`fold_in(fold_in(key_attacks, key_index(name)), first_index + i)`
(the attack functions run on it alone, under `vmap`), so the result is the
same whatever the batch, the compaction, the device count or the process
that attacks it, and a set attacked in pieces (`first_index`) equals the
set attacked at once.

Over several processes (`jax.distributed`), process p attacks rows p,
p + P, ... on its own devices; after each attack only the robust flags are
merged over processes, and the adversarial images only when asked
(`gather_adversarial`).
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
from vitat_jax.attack_names import key_index
from vitat_jax.attacks.apgd import single_run as apgd_single_run
from vitat_jax.attacks.fab import closest_hyperplane
from vitat_jax.attacks.fab import single_run as fab_single_run
from vitat_jax.attacks.fab import targeted_hyperplane
from vitat_jax.attacks.square import run_queries as square_queries
from vitat_jax.attacks.square import start_state as square_start
from vitat_jax.attacks.apgd import dlr_loss
from vitat_jax.attacks.apgd import dlr_loss_targeted
from vitat_jax.attacks.apgd import UNTARGETED_LOSSES
from vitat_jax.attacks.pgd import cross_entropy_per_example
from vitat_jax.errors import UserError

# XLA:CPU can compile the attack programs with YNNPACK for single dots
# only, not for its fusions of the elementwise and reduce ops around them.
# Where the model reduces over features (layer norms, softmax: every
# transformer here) the input gradients then ran 1.3-1.5x faster (tiny ViT,
# DeiT-Ti, DeiT-S); on an MLP without reductions the whole AutoAttack ran
# ~17% slower (benchmarks/NOTES.md). So it is chosen per model
# (`xla_cpu_dots_only`), and left out where the backend is not the CPU or
# the installed XLA does not know the option.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}
_FEATURE_REDUCTIONS = ("reduce_sum", "reduce_max")


@functools.cache
def compiler_options() -> Optional[Dict[str, str]]:
  """The XLA options of dots-only attack programs (None: none apply)."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception:  # pylint: disable=broad-except
    logging.info("XLA does not take %s; attacks compiled without it",
                 CPU_COMPILER_OPTIONS)
    return None
  return dict(CPU_COMPILER_OPTIONS)


def reduces_over_features(model_fn: Callable, x_one) -> bool:
  """Whether `model_fn(x)` sums or maxes over anything (its jaxpr, nested
  ones included, has reduce_sum or reduce_max)."""
  text = str(jax.make_jaxpr(model_fn)(x_one))
  return any(f"{name}[" in text for name in _FEATURE_REDUCTIONS)


def _jit(**jit_kwargs):
  """`jax.jit`, with `compiler_options()` where the static `model` asks for
  dots-only programs; decided at the call (not at import, which must not
  start a backend)."""

  def wrap(fn):
    jitted = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
      options = compiler_options() if kwargs["model"].dots_only else None
      variant = options is not None
      if variant not in jitted:
        jitted[variant] = jax.jit(fn, compiler_options=options, **jit_kwargs)
      return jitted[variant](*args, **kwargs)

    return call

  return wrap


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


def attack_settings(
    version: str,
    eps: float,
    norm: str = "Linf",
    attacks_to_run: Optional[Sequence[str]] = None,
    overrides: Optional[Dict[str, Dict[str,
                                       int]]] = None) -> List[AttackSettings]:
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
  restarts = {
      "apgd-ce": 5,
      "apgd-dlr": 5,
      "fab": 5,
      "apgd-t": 1,
      "fab-t": 1,
      "square": 1
  }
  eot = 1
  if version == "standard":
    restarts.update({"apgd-ce": 1, "apgd-dlr": 1, "fab": 1})
  elif version == "rand":
    restarts.update({"apgd-ce": 1, "apgd-dlr": 1})
    eot = 20
  settings = [
      AttackSettings(name=n,
                     eps=eps,
                     norm=norm,
                     n_restarts=restarts[n],
                     eot_iter=eot if n.startswith("apgd") else 1) for n in names
  ]
  return [_override(s, (overrides or {}).get(s.name, {})) for s in settings]


def _override(settings: AttackSettings, changes: Dict[str, Any]):
  allowed = {f.name for f in dataclasses.fields(AttackSettings)
            } - {"name", "eps", "norm"}
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
  dots_only: bool = False  # XLA:CPU's dots-only YNNPACK (compiler_options)

  def __call__(self, params, x, key):
    args = (params, x) if self.takes_params else (x,)
    if self.stochastic:
      args += (key,)
    return self.fn(*args)


def _per_point(point_fn: Callable) -> Callable:
  """`point_fn(key, x [1, ...], y [1]) -> tree` over a batch, one key per
  point: what a point gets depends on its key only, not on its batch."""

  def one(key, x, y):
    return jax.tree.map(lambda a: a[0], point_fn(key, x[None], y[None]))

  return jax.vmap(one)


def _point_keys(key, rows):
  """Point `rows[i]`'s key: `fold_in(key, rows[i])` (rows: global indices)."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)


def _stages(s: AttackSettings):
  """The host-level stages of an attack: (target, restart) pairs, each run
  only on the points every earlier stage left robust (as the reference
  loops over targets and restarts on the still-robust subset)."""
  targets = s.n_target_classes if s.name in ("apgd-t", "fab-t") else 1
  return [(t, r) for t in range(targets) for r in range(s.n_restarts)]


@_jit(static_argnames=("model", "settings"))
def _attack_stage(params, key, rows, x, y, target, restart, *, model: _Model,
                  settings: AttackSettings):
  """One stage (a target and a restart) of a white-box attack on a batch:
  (adversarial images, still correct)."""
  s = settings

  def point(key, x, y):
    key = jax.random.fold_in(jax.random.fold_in(key, target), restart)
    attack_key, check_key = jax.random.split(key)
    draw_key = jax.random.fold_in(check_key, 1)
    fixed = lambda xi: model(params, xi, draw_key)
    keyed = ((lambda xi, k: model(params, xi, k)) if model.stochastic else
             (lambda xi, _: fixed(xi)))
    clean_key, run_key = jax.random.split(attack_key)
    if s.name in ("apgd-t", "fab-t"):
      clean_logits = keyed(x, clean_key)
      order = jnp.argsort(clean_logits, axis=-1)
      targets = jnp.take(order, clean_logits.shape[-1] - 2 - target, axis=-1)
    if s.name.startswith("apgd"):
      if s.name == "apgd-t":
        loss_fn = lambda logits: dlr_loss_targeted(logits, y, targets)
      else:
        loss_fn = lambda logits: UNTARGETED_LOSSES[s.name[5:]](logits, y)
      _, still_robust, _, x_best_adv = apgd_single_run(keyed,
                                                       loss_fn,
                                                       run_key,
                                                       x,
                                                       y,
                                                       eps=s.eps,
                                                       norm=s.norm,
                                                       n_iter=s.n_iter,
                                                       eot_iter=s.eot_iter)
      adv = jnp.where(still_robust[:, None, None, None], x, x_best_adv)
    else:
      hyperplane = (targeted_hyperplane(fixed, targets)
                    if s.name == "fab-t" else closest_hyperplane(fixed))
      adv = fab_single_run(fixed,
                           hyperplane,
                           run_key,
                           x,
                           y,
                           eps=s.eps,
                           n_iter=s.n_iter,
                           alpha_max=0.1,
                           eta=1.05,
                           beta=0.9,
                           random_start=restart > 0)
      outside = jnp.max(jnp.abs(adv - x).reshape(x.shape[0], -1),
                        axis=-1) > s.eps
      adv = jnp.where(outside[:, None, None, None], x, adv)
    correct = jnp.argmax(model(params, adv, check_key), axis=-1) == y
    return jax.lax.stop_gradient(adv), correct

  return _per_point(point)(_point_keys(key, rows), x, y)


def _square_fns(model: _Model, settings: AttackSettings):
  """Square's start and query segment as per-point functions."""
  s = settings

  def keys(key, restart):
    key = jax.random.fold_in(key, restart)
    attack_key, check_key = jax.random.split(key)
    return attack_key, jax.random.fold_in(check_key, 1), check_key

  def start(params, key, x, y, restart):
    attack_key, draw_key, check_key = keys(key, restart)
    state = square_start(lambda xi: model(params, xi, draw_key),
                         attack_key,
                         x,
                         y,
                         eps=s.eps)
    correct = jnp.argmax(model(params, state[0], check_key), axis=-1) == y
    return state, correct

  def queries(params, key, x, y, state, restart, first, last):
    attack_key, draw_key, check_key = keys(key, restart)
    fixed = lambda xi: model(params, xi, draw_key)
    x_best, margin_best, loss_best = square_queries(fixed,
                                                    attack_key,
                                                    x,
                                                    y,
                                                    state,
                                                    first,
                                                    last,
                                                    eps=s.eps,
                                                    n_queries=s.n_queries,
                                                    p_init=0.8)
    correct = jnp.argmax(model(params, x_best, check_key), axis=-1) == y
    return (x_best, margin_best, loss_best), correct

  return start, queries


@_jit(static_argnames=("model", "settings"))
def _square_start(params, key, rows, x, y, restart, *, model, settings):
  start, _ = _square_fns(model, settings)
  return _per_point(lambda k, xi, yi: start(params, k, xi, yi, restart))(
      _point_keys(key, rows), x, y)


@_jit(static_argnames=("model", "settings"))
def _square_queries(params, key, rows, x, y, state, restart, first, last, *,
                    model, settings):
  _, queries = _square_fns(model, settings)
  point = lambda k, xi, yi, st: queries(params, k, xi, yi, st, restart, first,
                                        last)
  one = lambda k, xi, yi, st: jax.tree.map(
      lambda a: a[0],
      point(k, xi[None], yi[None], jax.tree.map(lambda a: a[None], st)))
  return jax.vmap(one)(_point_keys(key, rows), x, y, state)


# Query counts after which Square drops its broken points (the reference
# drops them after every query; each segment is one compiled while loop).
SQUARE_SEGMENTS = (10, 50, 200, 500, 1000, 2000, 3000, 4000, 6000, 8000)


def _square_segments(n_queries: int):
  ends = [q for q in SQUARE_SEGMENTS if q < n_queries] + [n_queries]
  return list(zip([0] + ends[:-1], ends))


@_jit(static_argnames=("model",))
def _clean_batch(params, key, rows, x, y, *, model: _Model):
  """Clean correctness, and which points have an all-zero loss gradient.

  The gradient is that of the DLR loss (CE with fewer than 3 classes): DLR
  is invariant to the logits' scale, so it is zero only where the model is
  flat, not where a confident softmax underflows.
  """

  def point(key, x, y):

    def loss(xi):
      logits = model(params, xi, key)
      per_example = (dlr_loss(logits, y) if logits.shape[-1] >= 3 else
                     cross_entropy_per_example(logits, y))
      return per_example.sum(), logits

    grad, logits = jax.grad(loss, has_aux=True)(x)
    zero_grad = jnp.sum(jnp.abs(grad).reshape(x.shape[0], -1), axis=-1) == 0
    return jnp.argmax(logits, axis=-1) == y, zero_grad

  return _per_point(point)(_point_keys(key, rows), x, y)


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
    attacked: attack name -> the number of points it started on.
    clean: [N] bool, classified correctly before any attack.
    perturbation: over the rows held, the largest perturbation (`max`, in
      the norm), the number of NaNs (`nan`), and the adversarial images'
      `max_value` and `min_value` (the reference's final log line).
    held: [N] bool, the rows whose adversarial images `adv_images` holds:
      all, except over several processes without `gather_adversarial`
      (then this process's rows; the others hold their clean images).
  """
  robust_accuracy: Dict[str, float]
  adv_images: np.ndarray
  robust: np.ndarray
  robust_after: Dict[str, np.ndarray]
  checks: Dict[str, Any]
  warnings: List[str]
  seconds: Dict[str, float]
  attacked: Dict[str, int]
  held: np.ndarray
  clean: np.ndarray
  perturbation: Dict[str, float]

  @property
  def accuracy(self) -> float:
    return float(self.robust.mean())


# A remainder smaller than batch_size is padded up to the next of four sizes
# per octave (..., 32, 40, 48, 56, 64, 80, ...), at least MIN_PADDED_BATCH:
# at most a quarter of its work is padding (a power of two wasted up to half:
# 39 robust points ran as 64, 1.6x the work, in every query of Square), for
# at most four programs per octave of set size.
MIN_PADDED_BATCH = 8
SIZES_PER_OCTAVE = 4


def padded_size(count: int) -> int:
  """The batch a remainder of `count` points runs as (before rounding to the
  device count): `count` rounded up to the sizes above."""
  if count <= MIN_PADDED_BATCH:
    return MIN_PADDED_BATCH
  step = max(1, (1 << ((count - 1).bit_length() - 1)) // SIZES_PER_OCTAVE)
  return -(-count // step) * step


def _chunks(indices: np.ndarray, batch_size: int, multiple: int = 1):
  """Fixed-shape chunks of indices, padded (with the last index): every
  full chunk has batch_size entries, the last `padded_size` of its count if
  smaller; both rounded up to a multiple of `multiple` (the local device
  count). Yields (padded indices, number valid)."""
  round_up = lambda k: -(-k // multiple) * multiple
  cap = round_up(batch_size)
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    size = min(cap, round_up(padded_size(len(chunk))))
    yield np.pad(chunk, (0, size - len(chunk)), mode="edge"), len(chunk)


def _identity(value):
  return value


def _own_rows_only(values, owner):
  del owner
  return values


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where AutoAttack runs: this process's devices and its share of rows.

  The default is a single process on all its local devices. The runner of a
  multi-process (multi-host) evaluation hands in
  `evaluation.autoattack_placement()`, whose functions gather sharded params
  into a local copy and merge the rows each process attacked.

  Attributes:
    devices: the devices each attack batch is sharded over (axis "data");
      None = `jax.local_devices()`.
    process_index, process_count: process p attacks rows p, p + P, ...
    local_params: the params as a full copy on this process's devices.
    merge_rows: `(values [N, ...], owner [N]) -> values`, row i as process
      owner[i] computed it.
    max_over_processes: the element-wise maximum of a small host array.
  """
  devices: Optional[Sequence[Any]] = None
  process_index: int = 0
  process_count: int = 1
  local_params: Callable = _identity
  merge_rows: Callable = _own_rows_only
  max_over_processes: Callable = _identity


class _Runner:
  """Runs a jitted per-point function on dense batches of chosen rows,
  each batch sharded over this process's devices ("data" axis), the
  params replicated."""

  def __init__(self, params, batch_size: int, first_index: int,
               placement: Placement):
    devices = placement.devices or jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.params = jax.device_put(
        placement.local_params(params),
        jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self.batch_size, self.first_index = batch_size, first_index

  def __call__(self, fn, key, todo, arrays, *extra_args, per_row=(), **static):
    """Yields (indices into `todo`, outputs) per batch: `fn(params, key,
    rows, *[a[todo] for a in arrays], *[a[positions] for a in per_row],
    *extra_args, **static)`, outputs cut to the valid rows."""
    sharding = jax.sharding.NamedSharding(self.mesh,
                                          jax.sharding.PartitionSpec("data"))
    put = lambda a: jax.device_put(np.asarray(a), sharding)
    for positions, valid in _chunks(np.arange(len(todo)), self.batch_size,
                                    self.mesh.devices.size):
      idx = todo[positions]
      rows = (self.first_index + idx).astype(np.uint32)
      args = [put(rows)] + [put(a[idx]) for a in arrays]
      args += [jax.tree.map(lambda a: put(a[positions]), t) for t in per_row]
      out = fn(self.params, key, *args, *extra_args, **static)
      yield positions[:valid], jax.tree.map(lambda a: np.asarray(a)[:valid],
                                            out)


def _first_batch_checks(model, params, key, x, version, settings, warnings):
  """The reference's checks on the first batch (eager, un-jitted passes, so
  a logits_fn with hidden randomness shows it)."""
  checks = {}
  outputs = [
      np.asarray(model(params, jnp.asarray(x), jax.random.fold_in(key, i)),
                 np.float64) for i in range(RANDOMIZED_PASSES)
  ]
  out = outputs[0]
  num_classes = out.shape[-1]
  checks["looks_like_probabilities"] = bool(
      out.max() < 1 + PROBABILITY_TOLERANCE and
      out.min() > -PROBABILITY_TOLERANCE and
      np.all(np.abs(out.sum(-1) - 1) < PROBABILITY_TOLERANCE))
  if checks["looks_like_probabilities"]:
    warnings.append("the outputs look like probabilities (in [0, 1], rows "
                    "summing to 1): pass logits, not softmax outputs")
  if version == "rand":
    checks["randomized"] = None
  else:
    unit = [
        o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs
    ]
    predictions = [o.argmax(-1) for o in outputs]
    max_diff = max(
        np.linalg.norm(a - b, axis=-1).max()
        for i, a in enumerate(unit)
        for b in unit[i + 1:])
    checks["randomized"] = bool(max_diff > RANDOMIZED_TOLERANCE or any(
        (p != predictions[0]).any() for p in predictions))
    if checks["randomized"]:
      warnings.append(f"{RANDOMIZED_PASSES} forward passes of the same images "
                      "differ: this looks like a randomised defence; use "
                      "version='rand'")
  too_few = num_classes < min_classes(settings)
  checks["too_few_classes"] = bool(too_few)
  if too_few:
    raise too_few_classes(num_classes, settings)
  return checks


def min_classes(settings: Sequence[AttackSettings]) -> int:
  """The fewest classes the attacks of `settings` work with: targeted ones
  need n_target_classes + 1, the DLR loss 4."""
  names = [s.name for s in settings]
  needed = [
      s.n_target_classes + 1 for s in settings if s.name in ("apgd-t", "fab-t")
  ]
  if "apgd-dlr" in names or "apgd-t" in names:
    needed.append(4)
  return max(needed + [0])


def too_few_classes(num_classes: int,
                    settings: Sequence[AttackSettings]) -> UserError:
  return UserError(f"the model has {num_classes} classes, too few for "
                   f"{', '.join(s.name for s in settings)} (targeted attacks "
                   "need n_target_classes + 1, DLR needs 4): use "
                   "version='custom' with apgd-ce, fab and square")


def autoattack(
    logits_fn: Callable,
    key,
    images,
    labels,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    version: str = "standard",
    attacks_to_run: Optional[Sequence[str]] = None,
    batch_size: int = 250,
    params=None,
    stochastic: bool = False,
    overrides: Optional[Dict[str, Dict[str, int]]] = None,
    run_checks: bool = True,
    verbose: bool = True,
    first_index: int = 0,
    gather_adversarial: bool = False,
    placement: Optional[Placement] = None,
    xla_cpu_dots_only: Optional[bool] = None,
    progress: Optional[Callable[[str, int, int],
                                None]] = None) -> AutoAttackResult:
  """Runs AutoAttack on `images` [N, H, W, C] in [0, 1] with integer labels.

  (Long on purpose: the ensemble's sequence, checks and per-attack
  bookkeeping read top to bottom as fra31's `run_standard_evaluation`, so
  the two can be audited side by side.)

  Args:
    logits_fn: `logits_fn(x) -> logits`; `logits_fn(params, x)` when
      `params` is given (then each attack compiles once per logits_fn and
      shape, not once per call); with `stochastic` a final `key` argument
      (a randomised model, for version="rand").
    key: PRNG key; the whole evaluation is a function of it.
    eps, norm: the threat model.
    version: "standard", "plus", "rand" or "custom" (with attacks_to_run,
      names from ATTACK_NAMES).
    batch_size: points per attack batch (over all local devices).
    overrides: per-attack changes to the version's settings (plain data),
      e.g. {"square": {"n_queries": 1000}, "apgd-ce": {"n_restarts": 3}}.
    run_checks: the sanity checks on the first batch and the zero gradients.
    first_index: the global index of images[0]: point i's randomness is
      keyed by first_index + i, so a set attacked in consecutive pieces
      gives the same result as attacked at once.
    gather_adversarial: over several processes, also merge the adversarial
      images (each process holds only its own rows' otherwise).
    xla_cpu_dots_only: on the CPU, compile with `CPU_COMPILER_OPTIONS`;
      None: where the model reduces over features (`reduces_over_features`).
    progress: called as `progress(attack, points done, points to do)` after
      every attack batch (Square: every query segment), on this process's
      rows: a long evaluation can say how far it is.

  Returns:
    An AutoAttackResult.
  """
  settings = attack_settings(version, eps, norm, attacks_to_run, overrides)
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
  if placement is None:
    if jax.process_count() > 1:
      raise UserError("autoattack in a multi-process run needs "
                      "placement=evaluation.autoattack_placement() (each "
                      "process attacks its own rows)")
    placement = Placement()
  model = _Model(logits_fn, params is not None, stochastic)
  if xla_cpu_dots_only is None:
    xla_cpu_dots_only = reduces_over_features(
        lambda x: model(params, x, jax.random.key(0)), x_all[:1])
  model = dataclasses.replace(model, dots_only=bool(xla_cpu_dots_only))
  runner = _Runner(params, batch_size, first_index, placement)
  check_key, clean_key, attacks_key = jax.random.split(key, 3)
  warnings = []
  checks = {}
  if run_checks:
    checks = _first_batch_checks(model, runner.params, check_key,
                                 x_all[:batch_size], version, settings,
                                 warnings)

  # Process p attacks rows p, p + P, ...; only the robust flags (and, when
  # asked, the adversarial images at the end) are merged over processes.
  n = len(x_all)
  owner = np.arange(n) % placement.process_count
  mine = np.flatnonzero(owner == placement.process_index)
  robust = np.zeros(n, bool)
  zero_grad = np.zeros(n, bool)
  for pos, (correct, zero) in runner(_clean_batch,
                                     clean_key,
                                     mine, (x_all, y_all),
                                     model=model):
    robust[mine[pos]], zero_grad[mine[pos]] = correct, zero
  robust = placement.merge_rows(robust, owner)
  zero_grad = placement.merge_rows(zero_grad, owner)
  robust_accuracy = {"clean": float(robust.mean())}
  clean = robust.copy()
  if run_checks:
    checks["zero_gradient_points"] = int((zero_grad & robust).sum())
    if checks["zero_gradient_points"]:
      warnings.append(f"{checks['zero_gradient_points']} correctly classified "
                      "points have a zero loss gradient: gradient-based "
                      "attacks are unreliable here (masked gradients?)")

  adv_all = x_all.copy()
  seconds = {}
  robust_after = {}
  attacked = {}
  for s in settings:
    start = time.perf_counter()
    attack_key = jax.random.fold_in(attacks_key, key_index(s.name))
    attacked[s.name] = int(robust.sum())
    report = progress or (lambda *args: None)
    if s.name == "square":
      _run_square(runner, model, s, attack_key, mine, robust, x_all, y_all,
                  adv_all, lambda done, total: report(s.name, done, total))
    else:
      stages = list(_stages(s))
      for stage, (target, restart) in enumerate(stages):
        todo = mine[robust[mine]]
        done = 0
        for pos, (adv, correct) in runner(_attack_stage,
                                          attack_key,
                                          todo, (x_all, y_all),
                                          target,
                                          restart,
                                          model=model,
                                          settings=s):
          broken = todo[pos][~correct]
          adv_all[broken] = adv[~correct]
          robust[broken] = False
          done += len(pos)
          report(f"{s.name} (stage {stage + 1}/{len(stages)})", done, len(todo))
    robust = placement.merge_rows(robust, owner)
    seconds[s.name] = time.perf_counter() - start
    robust_accuracy[s.name] = float(robust.mean())
    robust_after[s.name] = robust.copy()
    if verbose:
      logging.info("robust accuracy after %s: %.2f%% (%d points, %.1f s)",
                   s.name.upper(), 100 * robust_accuracy[s.name],
                   attacked[s.name], seconds[s.name])
  if gather_adversarial:
    adv_all = placement.merge_rows(adv_all, owner)
  held = (np.ones(n, bool) if gather_adversarial or placement.process_count == 1
          else owner == placement.process_index)

  if run_checks:
    _square_check(checks, robust_accuracy, warnings)
  for line in warnings:
    logging.warning("autoattack: %s", line)
  return AutoAttackResult(robust_accuracy=robust_accuracy,
                          adv_images=adv_all,
                          robust=robust,
                          robust_after=robust_after,
                          checks=checks,
                          warnings=warnings,
                          seconds=seconds,
                          attacked=attacked,
                          held=held,
                          clean=clean,
                          perturbation=_perturbation(adv_all, x_all, norm, held,
                                                     placement))


def _perturbation(adv, x, norm, held, placement) -> Dict[str, float]:
  delta = (adv[held] - x[held]).reshape(int(held.sum()), -1)
  size = (np.abs(delta).max(-1) if norm == "Linf" else np.sqrt(
      (delta**2).sum(-1)))
  values = np.asarray([
      size.max(initial=0.0),
      np.isnan(adv[held]).sum(), adv[held].max(initial=0.0),
      -adv[held].min(initial=1.0)
  ], np.float64)
  if not held.all():  # four numbers per host
    values = placement.max_over_processes(values)
  return dict(max=float(values[0]),
              nan=int(values[1]),
              max_value=float(values[2]),
              min_value=float(-values[3]))


def _square_check(checks, robust_accuracy, warnings):
  """Did Square (black box) lower the robust accuracy after white-box
  attacks? Then their gradients were probably unreliable."""
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


def combine_results(pieces: Sequence[AutoAttackResult]) -> Dict[str, Any]:
  """One set's numbers from AutoAttack runs on consecutive pieces of it
  (with `first_index`): flags concatenated, counts and times summed, the
  checks of every piece combined (adversarial images are not kept)."""
  robust = np.concatenate([p.robust for p in pieces])
  names = list(pieces[0].robust_after)
  robust_after = {
      k: np.concatenate([p.robust_after[k] for p in pieces]) for k in names
  }
  clean = np.concatenate([p.clean for p in pieces])
  robust_accuracy = {
      "clean": float(clean.mean()),
      **{
          k: float(v.mean()) for k, v in robust_after.items()
      }
  }
  before, broken = clean, {}
  for k in names:
    broken[k] = int((before & ~robust_after[k]).sum())
    before = robust_after[k]
  checks, warnings = {}, []
  for p in pieces:
    for k, v in p.checks.items():
      if k == "zero_gradient_points":
        checks[k] = checks.get(k, 0) + v
      elif k != "square_beats_white_box":
        checks[k] = None if v is None else bool(checks.get(k) or v)
    warnings += [
        w for w in p.warnings if w not in warnings and
        "Square lowered" not in w and "zero loss gradient" not in w
    ]
  if checks.get("zero_gradient_points"):
    warnings.append(f"{checks['zero_gradient_points']} correctly classified "
                    "points have a zero loss gradient: gradient-based "
                    "attacks are unreliable here (masked gradients?)")
  if checks:
    _square_check(checks, robust_accuracy, warnings)
  perturbation = {
      "max": max(p.perturbation["max"] for p in pieces),
      "nan": sum(p.perturbation["nan"] for p in pieces),
      "max_value": max(p.perturbation["max_value"] for p in pieces),
      "min_value": min(p.perturbation["min_value"] for p in pieces)
  }
  return dict(robust=robust,
              robust_after=robust_after,
              clean=clean,
              robust_accuracy=robust_accuracy,
              broken=broken,
              attacked={k: sum(p.attacked[k] for p in pieces) for k in names},
              seconds={k: sum(p.seconds[k] for p in pieces) for k in names},
              checks=checks,
              warnings=warnings,
              perturbation=perturbation)


def _run_square(runner,
                model,
                s,
                attack_key,
                mine,
                robust,
                x_all,
                y_all,
                adv_all,
                progress=lambda done, total: None):
  """Square on this process's robust rows, restart by restart; between
  query segments only the points still unbroken go on (dense batches);
  `progress(queries done, queries)` after each segment."""
  for restart in range(s.n_restarts):
    todo = mine[robust[mine]]
    if not len(todo):
      return
    x_best = np.empty((len(todo),) + x_all.shape[1:], np.float32)
    margin_best = np.empty(len(todo), np.float32)
    loss_best = np.empty(len(todo), np.float32)
    correct = np.ones(len(todo), bool)

    def store(pos, out):
      (x_best[pos], margin_best[pos], loss_best[pos]), correct[pos] = out

    for pos, out in runner(_square_start,
                           attack_key,
                           todo, (x_all, y_all),
                           restart,
                           model=model,
                           settings=s):
      store(pos, out)
    for first, last in _square_segments(s.n_queries):
      active = np.flatnonzero(margin_best > 0)
      if not len(active):
        break
      state = (x_best[active], margin_best[active], loss_best[active])
      for pos, out in runner(_square_queries,
                             attack_key,
                             todo[active], (x_all, y_all),
                             restart,
                             first,
                             last,
                             per_row=(state,),
                             model=model,
                             settings=s):
        store(active[pos], out)
      progress(restart * s.n_queries + last, s.n_restarts * s.n_queries)
    broken = ~correct
    adv_all[todo[broken]] = x_best[broken]
    robust[todo[broken]] = False

"""Evaluation runner: clean accuracy and robust accuracy under named attacks.

Attacks are named by strings so configs stay plain data: "clean", "pgd20",
"pgd100", "cw20" (any "pgd<k>" / "cw<k>"), and "aa" / "autoattack"
(AutoAttack, standard version). Every attack is one jitted function over
fixed-shape batches (the last batch is padded and masked), so evaluating a
whole test set compiles each attack once (AutoAttack: each of its attacks,
for a few batch shapes).
"""

import dataclasses
import re
import time
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax import attacks
from vitat_jax import parallel
from vitat_jax.data import pipeline
from vitat_jax.errors import UserError

_ATTACK_NAME = re.compile(r"^(clean|pgd(\d+)|cw(\d+)|aa|autoattack)$")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  name: str        # as written in the config, also the metrics key prefix
  kind: str        # "clean", "pgd", "cw" or "autoattack"
  steps: int = 0


def parse_attack(name: str) -> AttackSpec:
  """"pgd20" -> AttackSpec("pgd20", "pgd", 20); one-line error otherwise."""
  match = _ATTACK_NAME.match(name)
  if not match or name in ("pgd0", "cw0"):
    raise UserError(f"unknown evaluation attack {name!r}: use 'clean', "
                    "'pgd<steps>' (e.g. pgd20, pgd100), 'cw<steps>' (cw20) "
                    "or 'aa' (AutoAttack)")
  if name == "clean":
    return AttackSpec(name, "clean")
  if name in ("aa", "autoattack"):
    return AttackSpec(name, "autoattack")
  kind = "pgd" if name.startswith("pgd") else "cw"
  return AttackSpec(name, kind, int(match.group(2) or match.group(3)))


def make_attack_fn(model, spec: AttackSpec, *, eps: float, alpha: float,
                   restarts: int = 1) -> Callable:
  """jitted `(params, key, images, labels) -> bool correct [B]`."""
  if spec.kind == "autoattack":
    return _make_autoattack_fn(model, eps=eps)

  def correct(params, key, images, labels):
    logits_fn = lambda x: model.apply({"params": params}, x)
    if spec.kind != "clean":
      images = attacks.pgd(logits_fn, key, images, labels, eps=eps,
                           alpha=alpha, steps=spec.steps, restarts=restarts,
                           loss="ce" if spec.kind == "pgd" else "cw")
    return jnp.argmax(logits_fn(images), axis=-1) == labels

  return jax.jit(correct)


def _make_autoattack_fn(model, *, eps: float) -> Callable:
  """`(params, key, images, labels) -> bool robust [B]` via AutoAttack.

  Not one jitted function (AutoAttack gathers the still-robust points on the
  host between its attacks), but its attacks compile once: `logits_fn` is
  the same object for every batch and the params are an argument.
  """
  logits_fn = lambda params, x: model.apply({"params": params}, x)

  def robust(params, key, images, labels):
    result = attacks.autoattack(logits_fn, images, labels, params=params,
                                key=key, eps=eps, version="standard",
                                batch_size=images.shape[0], run_checks=False,
                                verbose=False)
    return result.robust

  return robust


def make_evaluator(model, attack_names: Sequence[str], *, eps: float,
                   alpha: float, restarts: int = 1,
                   shard_fn: Callable = lambda batch: batch):
  """Returns `evaluate(params, batches, key) -> {name + "_acc": fraction, ...}`.

  `batches` yields `(images uint8 or float, labels, valid)` of a fixed
  shape; `shard_fn` places a batch on the devices (identity on one device).
  The result also holds `num_eval_images` and `<name>_time_s`.
  """
  specs = [parse_attack(n) for n in attack_names]
  fns = {s.name: make_attack_fn(model, s, eps=eps, alpha=alpha,
                                restarts=restarts) for s in specs}

  def evaluate(params, batches, key) -> Dict[str, float]:
    counts = {s.name: 0 for s in specs}
    seconds = {s.name: 0.0 for s in specs}
    total = 0
    for batch_index, (images, labels, valid) in enumerate(batches):
      if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
      # Each process may hold only its rows: `valid` is gathered like
      # `correct`, so both cover the whole batch.
      images, labels, valid = shard_fn((images, labels.astype(np.int32),
                                        np.asarray(valid, bool)))
      valid = parallel.to_host(valid)
      total += int(valid.sum())
      for spec_index, spec in enumerate(specs):
        batch_key = jax.random.fold_in(jax.random.fold_in(key, spec_index),
                                       batch_index)
        start = time.perf_counter()
        correct = parallel.to_host(
            fns[spec.name](params, batch_key, images, labels))
        seconds[spec.name] += time.perf_counter() - start
        counts[spec.name] += int((correct & valid).sum())
    if total == 0:
      raise UserError("no evaluation images: check eval.num_examples and the "
                      "test split")
    result = {"num_eval_images": total}
    for spec in specs:
      result[f"{spec.name}_acc"] = counts[spec.name] / total
      result[f"{spec.name}_time_s"] = seconds[spec.name]
    return result

  return evaluate


def _jsonable(value):
  """Plain Python types for metrics.json / robustness.json."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def evaluate(model, params, source, attack_names: Sequence[str], *, key,
             eps: float, alpha: float, restarts: int = 1,
             batch_size: int = 128, num_examples=None,
             shard_fn: Callable = lambda batch: batch,
             workers=0) -> Dict[str, Any]:
  """Clean and robust accuracy of `params` on the first images of `source`.

  The one runner behind the end-of-training evaluation and `--mode=eval`.
  PGD/CW run batch by batch, each process reading only its rows of each
  batch (`shard_fn` assembles them, e.g. `parallel.shard_batch`) with
  `workers` decoding processes; AutoAttack ("aa") runs over the whole set at
  once, so its per-attack log and sanity checks land in the result under
  "autoattack".
  """
  specs = [parse_attack(n) for n in attack_names]
  batch_names = [s.name for s in specs if s.kind != "autoattack"]
  result: Dict[str, Any] = {}
  if batch_names:
    evaluator = make_evaluator(model, batch_names, eps=eps, alpha=alpha,
                               restarts=restarts, shard_fn=shard_fn)
    result.update(evaluator(
        params, pipeline.eval_batches(
            source, batch_size, num_examples,
            process_index=jax.process_index(),
            process_count=jax.process_count(), workers=workers), key))
  for index, spec in enumerate(s for s in specs if s.kind == "autoattack"):
    count = min(num_examples or len(source), len(source))
    images, labels = source.get_batch(np.arange(count))
    logits_fn = lambda p, x: model.apply({"params": p}, x)
    run = attacks.autoattack(
        logits_fn, images.astype(np.float32) / 255.0, labels, params=params,
        key=jax.random.fold_in(key, 10_000 + index), eps=eps,
        batch_size=batch_size, verbose=False)
    result["num_eval_images"] = count
    result[f"{spec.name}_acc"] = float(np.mean(run.robust))
    result[f"{spec.name}_time_s"] = float(sum(run.seconds.values()))
    result["autoattack"] = _jsonable({
        "version": "standard", "robust_accuracy": run.robust_accuracy,
        "seconds": run.seconds, "checks": run.checks,
        "warnings": run.warnings})
  return result

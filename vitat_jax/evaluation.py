"""Evaluation runner: clean accuracy and robust accuracy under named attacks.

Attacks are named by strings so configs stay plain data: "clean", "pgd20",
"pgd100", "cw20" (any "pgd<k>" / "cw<k>"), and "aa" / "autoattack"
(AutoAttack, standard version). Every attack is one jitted function over
fixed-shape batches (the last batch is padded and masked), so evaluating a
whole test set compiles each attack once (AutoAttack: each of its attacks,
for a few batch shapes).
"""

import dataclasses
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

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


# RobustBench's evaluation sets, by data set: (the config that selects it,
# the number of test images). ImageNet's (5,000 listed ids, Res256Crop224)
# is for the data pipeline to provide: add it here once data/ offers it.
ROBUSTBENCH_SETS = {"cifar10": 10_000}
PROTOCOLS = ("", "robustbench")
AUTOATTACK_CHUNK = 1024  # images attacked at once: host memory stays flat


def check_autoattack_config(config) -> None:
  """One-line errors for the `eval.autoattack` and `eval.protocol` fields,
  before any data is read or attack is run."""
  aa, ev = config.eval.autoattack, config.eval
  if ev.protocol not in PROTOCOLS:
    raise UserError(f"unknown eval.protocol {ev.protocol!r}: use '' (the "
                    "configured test images) or 'robustbench'")
  if ev.protocol == "robustbench":
    robustbench_num_examples(config)
  if not any(parse_attack(n).kind == "autoattack" for n in ev.attacks):
    return
  eps = ev.eps or config.attack.eps
  if not 0 < eps <= 1:
    raise UserError(f"eval.eps={eps} must be in (0, 1] (pixel units: 8/255 "
                    f"is {8 / 255:.4f})")
  custom = tuple(aa.attacks)
  version = "custom" if custom else aa.version
  if custom and aa.version not in ("standard", "custom"):
    raise UserError(f"eval.autoattack.attacks={list(custom)} is a custom "
                    f"list; it cannot be combined with version="
                    f"{aa.version!r} (leave the version at 'standard')")
  attacks.attack_settings(version, eps, aa.norm, custom or None)
  if aa.batch_size < 0:
    raise UserError(f"eval.autoattack.batch_size={aa.batch_size} must be >= "
                    "0 (0: eval.batch_size)")


def robustbench_num_examples(config) -> int:
  """The RobustBench protocol's test set on this data config: CIFAR-10's
  first 10,000 test images, unresized; else a one-line error."""
  data = config.data
  name = data.tfds_name if data.name == "tfds" else data.name
  if data.name != "tfds" or name not in ROBUSTBENCH_SETS:
    raise UserError(f"eval.protocol='robustbench' is defined here for "
                    f"{', '.join(ROBUSTBENCH_SETS)} (data.name='tfds'), not "
                    f"for data {name!r}; ImageNet's 5,000-image subset with "
                    "Res256Crop224 needs the data pipeline's support")
  if data.test_split != "test" or data.test_examples or data.image_size != 32:
    raise UserError("eval.protocol='robustbench' needs the whole CIFAR-10 "
                    "test split at 32 px: data.test_split='test', "
                    "data.test_examples=0, data.image_size=32")
  count = ROBUSTBENCH_SETS[name]
  if config.eval.num_examples > count:
    raise UserError(f"eval.num_examples={config.eval.num_examples}: the "
                    f"RobustBench set has {count} images")
  return config.eval.num_examples or count


def autoattack_options(config) -> Dict[str, Any]:
  """`evaluate`'s AutoAttack keywords from a config's `eval` section."""
  aa = config.eval.autoattack
  custom = tuple(aa.attacks)
  return dict(version="custom" if custom else aa.version,
              attacks_to_run=custom or None, norm=aa.norm,
              autoattack_batch_size=aa.batch_size or None,
              save_adversarial=config.eval.save_adversarial)


def fra31_log_lines(run: Dict[str, Any], norm: str) -> List[str]:
  """The AutoAttack log in fra31's `log.txt` form (its `logger` lines)."""
  names = list(run["robust_accuracy"])[1:]
  lines = [f"using {run['version']} version including {', '.join(names)}.",
           f"initial accuracy: {run['robust_accuracy']['clean']:.2%}"]
  total = 0.0
  for name in names:
    total += run["seconds"][name]
    broken = run["broken"][name]
    lines.append(f"{name} - 1/1 - {broken} out of {run['attacked'][name]} "
                 "successfully perturbed")
    lines.append(f"robust accuracy after {name.upper()}: "
                 f"{run['robust_accuracy'][name]:.2%} (total time "
                 f"{total:.1f} s)")
  p = run["perturbation"]
  lines.append(f"max {norm} perturbation: {p['max']:.5f}, nan in tensor: "
               f"{p['nan']}, max: {p['max_value']:.5f}, min: "
               f"{p['min_value']:.5f}")
  last = names[-1] if names else "clean"
  lines.append(f"robust accuracy: {run['robust_accuracy'][last]:.2%}")
  return lines


def _autoattack_set(model, params, source, count, *, key, eps, norm,
                    version, attacks_to_run, batch_size, save_adversarial,
                    output_dir):
  """AutoAttack over the first `count` images of `source`, a chunk at a
  time (point i keyed by i, so chunking changes nothing); keeps only the
  flags and counts, and the broken points' images when saving them."""
  logits_fn = lambda p, x: model.apply({"params": p}, x)
  chunk = max(AUTOATTACK_CHUNK, batch_size)
  pieces = []
  saved = {}
  for first in range(0, count, chunk):
    rows = np.arange(first, min(first + chunk, count))
    images, labels = source.get_batch(rows)
    x = images.astype(np.float32) / 255.0
    run = attacks.autoattack(
        logits_fn, x, labels, params=params, key=key, eps=eps, norm=norm,
        version=version, attacks_to_run=attacks_to_run,
        batch_size=batch_size, verbose=False, first_index=first,
        gather_adversarial=save_adversarial)
    pieces.append(run)
    if save_adversarial:
      robust_before = run.clean
      for name, after in run.robust_after.items():
        broken = robust_before & ~after
        entry = saved.setdefault(name, {"indices": [], "images": [],
                                        "labels": []})
        entry["indices"].append(rows[broken])
        entry["images"].append(run.adv_images[broken])
        entry["labels"].append(np.asarray(labels)[broken])
        robust_before = after
  combined = attacks.combine_results(pieces)
  if save_adversarial and output_dir and jax.process_index() == 0:
    directory = os.path.join(output_dir, "adversarial")
    os.makedirs(directory, exist_ok=True)
    for name, entry in saved.items():
      np.savez(os.path.join(directory, f"{name}.npz"),
               **{k: np.concatenate(v) for k, v in entry.items()},
               eps=eps, norm=norm)
  return combined


def evaluate(model, params, source, attack_names: Sequence[str], *, key,
             eps: float, alpha: float, restarts: int = 1,
             batch_size: int = 128, num_examples=None,
             shard_fn: Callable = lambda batch: batch,
             workers=0,
             version: str = "standard", attacks_to_run=None,
             norm: str = "Linf", autoattack_batch_size: Optional[int] = None,
             save_adversarial: bool = False,
             output_dir: Optional[str] = None) -> Dict[str, Any]:
  """Clean and robust accuracy of `params` on the first images of `source`.

  The one runner behind the end-of-training evaluation and `--mode=eval`.
  PGD/CW run batch by batch, each process reading only its rows of each
  batch (`shard_fn` assembles them, e.g. `parallel.shard_batch`) with
  `workers` decoding processes; AutoAttack ("aa") runs over the set a chunk
  of images at a time, with `version` / `attacks_to_run` / `norm`; its
  per-attack log and sanity checks land in the result under "autoattack",
  and with `output_dir` it writes `log.txt` there (fra31's format) and,
  with `save_adversarial`, `adversarial/<attack>.npz` (the points that
  attack broke: indices, images, labels).
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
    run = _autoattack_set(
        model, params, source, count,
        key=jax.random.fold_in(key, 10_000 + index), eps=eps, norm=norm,
        version=version, attacks_to_run=attacks_to_run,
        batch_size=autoattack_batch_size or batch_size,
        save_adversarial=save_adversarial, output_dir=output_dir)
    result["num_eval_images"] = count
    result[f"{spec.name}_acc"] = float(np.mean(run["robust"]))
    result[f"{spec.name}_time_s"] = float(sum(run["seconds"].values()))
    run["version"] = version
    result["autoattack"] = _jsonable({
        k: run[k] for k in ("version", "robust_accuracy", "seconds",
                            "checks", "warnings", "attacked", "broken",
                            "perturbation")})
    if output_dir and jax.process_index() == 0:
      os.makedirs(output_dir, exist_ok=True)
      with open(os.path.join(output_dir, "log.txt"), "w") as f:
        f.write("\n".join(fra31_log_lines(run, norm)) + "\n")
  return result

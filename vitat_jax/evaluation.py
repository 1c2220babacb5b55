"""The evaluation runner: clean and robust accuracy under named attacks.

    evaluator = evaluation.Evaluator.from_config(config, model, shard_fn)
    evaluator.epoch(params, test_source, key)          # eval.epoch_attacks
    evaluator.final(params, test_source, key, workdir)  # eval.attacks

One `Evaluator`, built once from a config's `eval` section, serves the
evaluations after each epoch, the final one and `--mode=eval`. Attacks are
named as `attack_names` spells them. PGD/CW run batch by batch, each one
jitted function over fixed-shape batches (the last batch padded and
masked), compiled once per evaluator; AutoAttack ("aa") runs over the set a
chunk at a time, with its sanity checks, wherever it is listed.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vitat_jax import attacks
from vitat_jax import parallel
from vitat_jax import workdir as workdir_lib
from vitat_jax.attack_names import AttackSpec
from vitat_jax.attack_names import parse_attack
from vitat_jax.data import pipeline
from vitat_jax.errors import UserError
from vitat_jax.models import precision


def eval_eps(config) -> float:
  """The evaluation radius: `eval.eps`, else the training attack's."""
  return config.eval.eps or config.attack.eps


def make_attack_fn(model,
                   spec: AttackSpec,
                   *,
                   eps: float,
                   alpha: float,
                   restarts: int = 1) -> Callable:
  """jitted `(params, key, images, labels) -> bool correct [B]` for a batch
  attack (clean, pgd<k>, cw<k>)."""
  if spec.kind == "autoattack":
    raise ValueError("AutoAttack runs over a set, not per batch: use "
                     "Evaluator")

  def correct(params, key, images, labels):
    logits_fn = lambda x: model.apply({"params": params}, x)
    if spec.kind != "clean":
      images = attacks.pgd(logits_fn,
                           key,
                           images,
                           labels,
                           eps=eps,
                           alpha=alpha,
                           steps=spec.steps,
                           restarts=restarts,
                           loss="ce" if spec.kind == "pgd" else "cw")
    return jnp.argmax(logits_fn(images), axis=-1) == labels

  return jax.jit(correct)


class Evaluator:
  """Clean and robust accuracy of params on the first images of a source.

  Args:
    model: the Flax module.
    eps, alpha, restarts: the PGD/CW radius (pixel units), step and random
      starts; eps is also AutoAttack's.
    batch_size: images per PGD/CW batch (`shard_fn` places a batch on the
      devices, e.g. `parallel.shard_batch`; each process reads only its
      rows, decoded by `workers` processes).
    version, attacks_to_run, norm, autoattack_batch_size, save_adversarial:
      AutoAttack's settings (`autoattack_options`).
  """

  def __init__(self,
               model,
               *,
               eps: float,
               alpha: float,
               restarts: int = 1,
               batch_size: int = 128,
               shard_fn: Callable = lambda batch: batch,
               workers=0,
               version: str = "standard",
               attacks_to_run=None,
               norm: str = "Linf",
               autoattack_batch_size: Optional[int] = None,
               save_adversarial: bool = False):
    self.model, self.eps, self.alpha, self.restarts = model, eps, alpha, restarts
    self.batch_size, self.shard_fn, self.workers = batch_size, shard_fn, workers
    self.autoattack = dict(version=version,
                           attacks_to_run=attacks_to_run,
                           norm=norm,
                           save_adversarial=save_adversarial,
                           batch_size=autoattack_batch_size or batch_size)
    self._batch_fns: Dict[str, Callable] = {}  # jitted once, reused
    self.epoch_attacks, self.epoch_num_examples = (), 0
    self.final_attacks, self.final_num_examples = (), None

  @classmethod
  def from_config(cls, config, model, shard_fn) -> "Evaluator":
    """The evaluations of `config.eval`, after each epoch and at the end
    (in `eval.compute_dtype` when it is set; float32 at HIGHEST precision
    unless `matmul_precision` says otherwise)."""
    ev = config.eval
    if ev.compute_dtype:
      model = model.clone(
          dtype=jnp.dtype(parallel.compute_dtype_for(ev.compute_dtype)))
    model = model.clone(precision=precision.matmul_precision_for(
        config.matmul_precision, model.dtype, evaluation=True))
    evaluator = cls(model,
                    eps=eval_eps(config),
                    alpha=ev.alpha,
                    restarts=ev.restarts,
                    batch_size=ev.batch_size,
                    shard_fn=shard_fn,
                    workers=config.data.workers,
                    **autoattack_options(config))
    evaluator.epoch_attacks = tuple(ev.epoch_attacks)
    evaluator.epoch_num_examples = ev.epoch_num_examples
    evaluator.final_attacks = tuple(ev.attacks)
    evaluator.final_num_examples = (robustbench_num_examples(config)
                                    if ev.protocol == "robustbench" else
                                    ev.num_examples or None)
    return evaluator

  def epoch(self, params, source, key) -> Dict[str, Any]:
    """`eval.epoch_attacks` on the first `eval.epoch_num_examples` images."""
    return self(params,
                source,
                self.epoch_attacks,
                key=key,
                num_examples=self.epoch_num_examples)

  def final(self, params, source, key, output_dir=None) -> Dict[str, Any]:
    """`eval.attacks` on the configured test images; AutoAttack's log.txt
    (and adversarial examples) go to `output_dir`."""
    return self(params,
                source,
                self.final_attacks,
                key=key,
                num_examples=self.final_num_examples,
                output_dir=output_dir)

  def _batch_fn(self, spec: AttackSpec) -> Callable:
    if spec.name not in self._batch_fns:
      self._batch_fns[spec.name] = make_attack_fn(self.model,
                                                  spec,
                                                  eps=self.eps,
                                                  alpha=self.alpha,
                                                  restarts=self.restarts)
    return self._batch_fns[spec.name]

  def __call__(self,
               params,
               source,
               attack_names: Sequence[str],
               *,
               key,
               num_examples=None,
               output_dir: Optional[str] = None) -> Dict[str, Any]:
    """{name + "_acc": fraction, name + "_time_s", "num_eval_images"}; with
    AutoAttack also "autoattack" (its per-attack log and sanity checks), and
    with `output_dir` its `log.txt` (fra31's format) and, when saving them,
    `adversarial/<attack>.npz` (the points that attack broke)."""
    specs = [parse_attack(n) for n in attack_names]
    batch_specs = [s for s in specs if s.kind != "autoattack"]
    result: Dict[str, Any] = {}
    if batch_specs:
      result.update(
          self._run_batches(params, source, batch_specs, num_examples, key))
    for index, spec in enumerate(s for s in specs if s.kind == "autoattack"):
      count = min(num_examples or len(source), len(source))
      result.update(
          self._run_autoattack(params, source, spec, count,
                               jax.random.fold_in(key, 10_000 + index),
                               output_dir))
    return result

  def _run_batches(self, params, source, specs, num_examples, key):
    counts = {s.name: 0 for s in specs}
    seconds = {s.name: 0.0 for s in specs}
    total = 0
    batches = pipeline.eval_batches(source,
                                    self.batch_size,
                                    num_examples,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    workers=self.workers)
    for batch_index, (images, labels, valid) in enumerate(batches):
      if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
      # Each process may hold only its rows: `valid` is gathered like
      # `correct`, so both cover the whole batch.
      images, labels, valid = self.shard_fn(
          (images, labels.astype(np.int32), np.asarray(valid, bool)))
      valid = parallel.to_host(valid)
      total += int(valid.sum())
      for spec_index, spec in enumerate(specs):
        batch_key = jax.random.fold_in(jax.random.fold_in(key, spec_index),
                                       batch_index)
        start = time.perf_counter()
        correct = parallel.to_host(
            self._batch_fn(spec)(params, batch_key, images, labels))
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

  def _run_autoattack(self, params, source, spec, count, key, output_dir):
    options = self.autoattack
    run = _autoattack_set(self.model,
                          params,
                          source,
                          count,
                          key=key,
                          eps=self.eps,
                          output_dir=output_dir,
                          **options)
    run["version"] = options["version"]
    if output_dir and jax.process_index() == 0:
      workdir_lib.makedirs(output_dir)
      workdir_lib.write_text(
          workdir_lib.path(output_dir, workdir_lib.AUTOATTACK_LOG),
          "\n".join(fra31_log_lines(run, options["norm"])) + "\n")
    return {
        "num_eval_images":
            count,
        f"{spec.name}_acc":
            float(np.mean(run["robust"])),
        f"{spec.name}_time_s":
            float(sum(run["seconds"].values())),
        "autoattack":
            workdir_lib.jsonable({
                k: run[k]
                for k in ("version", "robust_accuracy", "seconds", "checks",
                          "warnings", "attacked", "broken", "perturbation")
            })
    }


# RobustBench's evaluation sets: (data set, number of test images).
# CIFAR-10: the first 10,000 test images (tfds), unresized. ImageNet: the
# 5,000 listed validation files (an image folder), at 224 px.
ROBUSTBENCH_SETS = {"cifar10": 10_000, "imagenet": 5_000}
# RobustBench's ImageNet preprocessings (robustbench.data.PREPROCESSINGS)
# as this library's eval transforms: Resize(256) + CenterCrop(224), its
# default, and Resize([224, 224]), which it uses for this paper's models.
ROBUSTBENCH_PREPROCESSING = {
    "Res256Crop224":
        dict(eval_transform="resize_center_crop", crop_pct=224 / 256),
    "Res224":
        dict(eval_transform="squash"),
}
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
  eps = eval_eps(config)
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


def robustbench_set(config) -> str:
  """The RobustBench set `eval.protocol='robustbench'` means for this data
  config ('cifar10' or 'imagenet'); else a one-line error."""
  data = config.data
  if data.name == "image_folder":
    preprocessing = config.eval.robustbench_preprocessing
    if preprocessing not in ROBUSTBENCH_PREPROCESSING:
      raise UserError(
          f"eval.robustbench_preprocessing={preprocessing!r}: use one of "
          f"{', '.join(ROBUSTBENCH_PREPROCESSING)} (RobustBench's names)")
    if data.image_size != 224:
      raise UserError(f"eval.protocol='robustbench' on ImageNet evaluates at "
                      f"224 px; this model takes data.image_size="
                      f"{data.image_size}")
    return "imagenet"
  name = data.tfds_name if data.name == "tfds" else data.name
  if data.name == "tfds" and name == "cifar10":
    if data.test_split != "test" or data.test_examples or data.image_size != 32:
      raise UserError("eval.protocol='robustbench' needs the whole CIFAR-10 "
                      "test split at 32 px: data.test_split='test', "
                      "data.test_examples=0, data.image_size=32")
    return "cifar10"
  raise UserError(f"eval.protocol='robustbench' is defined here for cifar10 "
                  f"(data.name='tfds') and ImageNet (data.name="
                  f"'image_folder' with ImageNet's val/ as root/test/), not "
                  f"for data {name!r}")


def robustbench_num_examples(config) -> int:
  """How many images of the RobustBench set the protocol evaluates: all of
  them, or the first `eval.num_examples`."""
  count = ROBUSTBENCH_SETS[robustbench_set(config)]
  if config.eval.num_examples > count:
    raise UserError(f"eval.num_examples={config.eval.num_examples}: the "
                    f"RobustBench set has {count} images")
  return config.eval.num_examples or count


def protocol_data_config(config):
  """`config.data` as `eval.protocol` evaluates it: on ImageNet the
  RobustBench protocol reads its 5,000 files with its preprocessing,
  whatever the run trained with (the test split only)."""
  if (config.eval.protocol != "robustbench" or
      robustbench_set(config) != "imagenet"):
    return config.data
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_subset = "robustbench"
  data.test_examples = 0
  data.update(ROBUSTBENCH_PREPROCESSING[config.eval.robustbench_preprocessing])
  return data


def autoattack_options(config) -> Dict[str, Any]:
  """`evaluate`'s AutoAttack keywords from a config's `eval` section."""
  aa = config.eval.autoattack
  custom = tuple(aa.attacks)
  return dict(version="custom" if custom else aa.version,
              attacks_to_run=custom or None,
              norm=aa.norm,
              autoattack_batch_size=aa.batch_size or None,
              save_adversarial=config.eval.save_adversarial)


def fra31_log_lines(run: Dict[str, Any], norm: str) -> List[str]:
  """The AutoAttack log in fra31's `log.txt` form (its `logger` lines)."""
  names = list(run["robust_accuracy"])[1:]
  lines = [
      f"using {run['version']} version including {', '.join(names)}.",
      f"initial accuracy: {run['robust_accuracy']['clean']:.2%}"
  ]
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


def _autoattack_set(model, params, source, count, *, key, eps, norm, version,
                    attacks_to_run, batch_size, save_adversarial, output_dir):
  """AutoAttack over the first `count` images of `source`, a chunk at a
  time (point i keyed by i, so chunking changes nothing); keeps only the
  flags and counts, and the broken points' images when saving them."""
  logits_fn = lambda p, x: model.apply({"params": p}, x)
  chunk = max(AUTOATTACK_CHUNK, batch_size)
  pieces = []
  saved = {}
  dots_only = None  # the model's XLA:CPU choice, traced once per set
  for first in range(0, count, chunk):
    rows = np.arange(first, min(first + chunk, count))
    images, labels = source.get_batch(rows)
    x = images.astype(np.float32) / 255.0
    if dots_only is None:
      dots_only = attacks.reduces_over_features(lambda v: logits_fn(params, v),
                                                x[:1])
    run = attacks.autoattack(logits_fn,
                             x,
                             labels,
                             params=params,
                             key=key,
                             eps=eps,
                             norm=norm,
                             version=version,
                             attacks_to_run=attacks_to_run,
                             batch_size=batch_size,
                             verbose=False,
                             first_index=first,
                             gather_adversarial=save_adversarial,
                             placement=parallel.autoattack_placement(),
                             xla_cpu_dots_only=dots_only)
    if save_adversarial:
      robust_before = run.clean
      for name, after in run.robust_after.items():
        broken = robust_before & ~after
        entry = saved.setdefault(name, {
            "indices": [],
            "images": [],
            "labels": []
        })
        entry["indices"].append(rows[broken])
        entry["images"].append(run.adv_images[broken])
        entry["labels"].append(np.asarray(labels)[broken])
        robust_before = after
    # The flags and counts only: a chunk's images (12 MB at 32 px, 600 MB
    # at 224) would otherwise stay for the whole set.
    pieces.append(dataclasses.replace(run, adv_images=None))
  combined = attacks.combine_results(pieces)
  if save_adversarial and output_dir and jax.process_index() == 0:
    directory = workdir_lib.path(output_dir, workdir_lib.ADVERSARIAL_DIR)
    workdir_lib.makedirs(directory)
    for name, entry in saved.items():
      with epath.Path(workdir_lib.path(directory,
                                       f"{name}.npz")).open("wb") as f:
        np.savez(f,
                 **{
                     k: np.concatenate(v) for k, v in entry.items()
                 },
                 eps=eps,
                 norm=norm)
  return combined

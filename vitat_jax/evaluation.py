"""The evaluation runner: clean and robust accuracy under named attacks.

    evaluator = evaluation.Evaluator.from_config(config, model, shard_fn)
    evaluator.epoch(params, test_source, key)          # eval.epoch_attacks
    evaluator.final(params, test_source, key, workdir)  # eval.attacks

One `Evaluator`, built once from a config's `eval` section, serves the
evaluations after each epoch, the final one and `--mode=eval`. Attacks are
named as `attack_names` spells them. PGD/CW run batch by batch, each one
jitted function over fixed-shape batches (the last batch padded and
masked), compiled once per evaluator; AutoAttack ("aa") runs over the set a
chunk at a time, with its sanity checks, wherever it is listed. Each
attack's key is `fold_in(key, attack_names.key_index(name))`: its name
alone decides its randomness. A script adds attacks by name with
`register_attack(name, attack)`, `attack(logits_fn, key, x, y, *, eps,
alpha) -> x_adv`; they run batch by batch as PGD does, their result
projected onto the eps-ball and the [0, 1] box. Files go through
`results.py`.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax import attacks
from vitat_jax import parallel
from vitat_jax import results
from vitat_jax import workdir as workdir_lib
from vitat_jax.attack_names import AttackSpec
from vitat_jax.attack_names import key_index
from vitat_jax.attack_names import parse_attack
from vitat_jax.attack_names import register_attack  # pylint: disable=unused-import
from vitat_jax.attack_names import registered_attack
from vitat_jax.data import pipeline
from vitat_jax.data import protocol
from vitat_jax.data import subsets
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
                   restarts: int = 1,
                   with_images: bool = False) -> Callable:
  """jitted `(params, key, images, labels) -> bool correct [B]` (images
  uint8 or [0, 1] floats) for a batch attack (clean, pgd<k>, cw<k>, a registered one); `with_images`:
  `(correct, clean_correct, adversarial images)`, for saving what the
  attack broke."""
  if spec.kind == "autoattack":
    raise ValueError("AutoAttack runs over a set, not per batch: use "
                     "Evaluator")

  def correct(params, key, images, labels):
    # Images arrive as uint8 (a quarter of float32's bytes from the host)
    # and become [0, 1] floats here, on the device.
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    logits_fn = lambda x: model.apply({"params": params}, x)
    adversarial = images
    if spec.kind == "registered":
      x_adv = registered_attack(spec.name)(logits_fn,
                                           key,
                                           images,
                                           labels,
                                           eps=eps,
                                           alpha=alpha)
      if getattr(x_adv, "shape", None) != images.shape:
        raise UserError(f"attack {spec.name!r} returned shape "
                        f"{getattr(x_adv, 'shape', type(x_adv))} for images "
                        f"{images.shape}: it must return x_adv like x")
      # The threat model is the evaluation's, whatever the attack does.
      adversarial = jax.lax.stop_gradient(
          images + attacks.project(images,
                                   x_adv.astype(images.dtype) - images, eps))
    elif spec.kind != "clean":
      adversarial = attacks.pgd(logits_fn,
                                key,
                                images,
                                labels,
                                eps=eps,
                                alpha=alpha,
                                steps=spec.steps,
                                restarts=restarts,
                                loss="ce" if spec.kind == "pgd" else "cw")
    robust = jnp.argmax(logits_fn(adversarial), axis=-1) == labels
    if not with_images:
      return robust
    clean = jnp.argmax(logits_fn(images), axis=-1) == labels
    return robust, clean, adversarial

  return jax.jit(correct)


class Evaluator:
  """Clean and robust accuracy of params on (a stratified subset of) a source.

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
    # N of a test set is a seeded, class-stratified subset (`subsets`),
    # except under a protocol with a fixed order (RobustBench's first N).
    self.subset_seed, self.final_stratified = 0, True
    self._subsets = {}  # (id(source), N, stratified) -> (source, subset, text)

  @classmethod
  def from_config(cls, config, model, shard_fn) -> "Evaluator":
    """The evaluations of `config.eval`, after each epoch and at the end
    (in `eval.compute_dtype` when it is set; float32 at HIGHEST precision
    unless `matmul_precision` says otherwise)."""
    ev = config.eval
    if ev.compute_dtype and model is not None:
      model = model.clone(
          dtype=jnp.dtype(parallel.compute_dtype_for(ev.compute_dtype)))
    if model is not None:  # (None: an evaluator that only picks subsets)
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
    evaluator.final_num_examples = (protocol.robustbench_num_examples(config)
                                    if ev.protocol == "robustbench" else
                                    ev.num_examples or None)
    evaluator.subset_seed = config.data.subset_seed
    evaluator.final_stratified = ev.protocol != "robustbench"
    return evaluator

  def examples(self, source, num_examples, stratified=True):
    """(the images an evaluation of `num_examples` reads, what they are):
    `subsets.first_examples`, picked and logged once per source and N."""
    key = (id(source), num_examples, stratified)
    if key not in self._subsets:
      subset, text = subsets.first_examples(source, num_examples,
                                            self.subset_seed, stratified)
      self._subsets[key] = (source, subset, text)
    return self._subsets[key][1:]

  def epoch(self, params, source, key) -> Dict[str, Any]:
    """`eval.epoch_attacks` on `eval.epoch_num_examples` images (a
    stratified subset)."""
    subset, _ = self.examples(source, self.epoch_num_examples)
    return self(params, subset, self.epoch_attacks, key=key, log="progress")

  def final(self, params, source, key, output_dir=None) -> Dict[str, Any]:
    """`eval.attacks` on the configured test images (`eval_subset` says
    which); AutoAttack's log.txt (and adversarial examples) go to
    `output_dir`."""
    subset, text = self.examples(source, self.final_num_examples,
                                 self.final_stratified)
    logging.info("final evaluation: %s on %s", ", ".join(self.final_attacks),
                 text)
    result = self(params,
                  subset,
                  self.final_attacks,
                  key=key,
                  output_dir=output_dir,
                  log="progress, end")
    result["eval_subset"] = text
    return result

  def _batch_fn(self, spec: AttackSpec, with_images: bool = False) -> Callable:
    if (spec.name, with_images) not in self._batch_fns:
      self._batch_fns[spec.name,
                      with_images] = make_attack_fn(self.model,
                                                    spec,
                                                    eps=self.eps,
                                                    alpha=self.alpha,
                                                    restarts=self.restarts,
                                                    with_images=with_images)
    return self._batch_fns[spec.name, with_images]

  def __call__(self,
               params,
               source,
               attack_names: Sequence[str],
               *,
               key,
               num_examples=None,
               output_dir: Optional[str] = None,
               log: str = "start, progress, end") -> Dict[str, Any]:
    """{name + "_acc": fraction, name + "_time_s", "num_eval_images"}; with
    AutoAttack also "autoattack" (its per-attack log and sanity checks), and
    with `output_dir` its `log.txt` (fra31's format) and, when saving them,
    `adversarial/<attack>.npz` (the points that attack broke). A long
    evaluation logs its start, its progress every PROGRESS_EVERY_S and its
    end, as far as `log` names them (the epoch evaluations log only their
    progress: the training loop logs their result)."""
    specs = [parse_attack(n) for n in attack_names]
    batch_specs = [s for s in specs if s.kind != "autoattack"]
    result: Dict[str, Any] = {}
    if batch_specs:
      result.update(
          self._run_batches(params, source, batch_specs, num_examples, key, log,
                            output_dir))
    for spec in (s for s in specs if s.kind == "autoattack"):
      count = min(num_examples or len(source), len(source))
      result.update(
          self._run_autoattack(params, source, spec, count,
                               jax.random.fold_in(key, key_index(spec.name)),
                               output_dir))
    return result

  def _run_batches(self, params, source, specs, num_examples, key, log,
                   output_dir):
    counts = {s.name: 0 for s in specs}
    seconds = {s.name: 0.0 for s in specs}
    total = 0
    expected = min(num_examples or len(source), len(source))
    if "start" in log:
      logging.info("evaluating %s on %d test images",
                   ", ".join(s.name for s in specs), expected)
    started = last_line = time.perf_counter()
    # PGD/CW adversarial examples (with eval.save_adversarial): the points
    # each attack broke, as AutoAttack saves them, by test-split index.
    saving = bool(self.autoattack["save_adversarial"] and output_dir)
    saved = {}
    test_indices = getattr(source, "indices", np.arange(len(source)))
    batches = pipeline.eval_batches(source,
                                    self.batch_size,
                                    num_examples,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    workers=self.workers)
    for batch_index, (images, labels, valid) in enumerate(batches):
      # Each process may hold only its rows: `valid` is gathered like
      # `correct`, so both cover the whole batch.
      images, labels, valid = self.shard_fn(
          (images, labels.astype(np.int32), np.asarray(valid, bool)))
      valid = parallel.to_host(valid)
      total += int(valid.sum())
      for spec in specs:
        batch_key = jax.random.fold_in(
            jax.random.fold_in(key, key_index(spec.name)), batch_index)
        start = time.perf_counter()
        save = saving and spec.kind != "clean"
        out = parallel.to_host(
            self._batch_fn(spec, save)(params, batch_key, images, labels))
        correct = out[0] if save else out
        if save:
          broken = valid & out[1] & ~correct
          rows = batch_index * self.batch_size + np.flatnonzero(broken)
          entry = saved.setdefault(spec.name, {
              "indices": [],
              "images": [],
              "labels": []
          })
          entry["indices"].append(test_indices[rows])
          entry["images"].append(np.asarray(out[2])[broken])
          entry["labels"].append(parallel.to_host(labels)[broken])
        seconds[spec.name] += time.perf_counter() - start
        counts[spec.name] += int((correct & valid).sum())
      now = time.perf_counter()
      if ("progress" in log and now - last_line >= PROGRESS_EVERY_S and
          total < expected):
        last_line = now
        logging.info(
            "evaluated %d/%d images (%s so far), about %.0f s left", total,
            expected,
            ", ".join(f"{s.name} {counts[s.name] / total:.3f}" for s in specs),
            (now - started) * (expected - total) / total)
    if total == 0:
      raise UserError("no evaluation images: check eval.num_examples and the "
                      "test split")
    if saved and jax.process_index() == 0:
      written = results.write_adversarial(output_dir,
                                          saved,
                                          eps=self.eps,
                                          norm="Linf")
      if written:
        logging.info("adversarial examples saved: %s", ", ".join(written))
    result = {"num_eval_images": total}
    for spec in specs:
      result[f"{spec.name}_acc"] = counts[spec.name] / total
      result[f"{spec.name}_time_s"] = seconds[spec.name]
    if "end" in log:
      logging.info(
          "evaluated %d images in %.0f s: %s", total,
          time.perf_counter() - started,
          ", ".join(f"{s.name} {result[s.name + '_acc']:.4f}" for s in specs))
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
      results.write_autoattack_log(output_dir, run, options["norm"])
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


# A log line at least this often during a long evaluation (files, no TTY).
PROGRESS_EVERY_S = 30
AUTOATTACK_CHUNK = 1024  # images attacked at once: host memory stays flat


def autoattack_options(config) -> Dict[str, Any]:
  """`evaluate`'s AutoAttack keywords from a config's `eval` section."""
  aa = config.eval.autoattack
  custom = tuple(aa.attacks)
  return dict(version="custom" if custom else aa.version,
              attacks_to_run=custom or None,
              norm=aa.norm,
              autoattack_batch_size=aa.batch_size or None,
              save_adversarial=config.eval.save_adversarial)


def autoattack_placement():
  """`attacks.autoattack`'s placement in this (possibly multi-host) run:
  each process attacks its rows on its local devices, with a local copy of
  the (replicated or FSDP-sharded) params; robust flags merge over hosts."""
  return attacks.Placement(devices=jax.local_devices(),
                           process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           local_params=parallel.single_device_copy,
                           merge_rows=parallel.merge_owned_rows,
                           max_over_processes=parallel.process_max)


def _autoattack_set(model, params, source, count, *, key, eps, norm, version,
                    attacks_to_run, batch_size, save_adversarial, output_dir):
  """AutoAttack over the first `count` images of `source`, a chunk at a
  time (point i keyed by i, so chunking changes nothing); keeps only the
  flags and counts, and the broken points' images when saving them."""
  logits_fn = lambda p, x: model.apply({"params": p}, x)
  chunk = max(AUTOATTACK_CHUNK, batch_size)
  # Saved points are named by their index in the test split.
  test_indices = getattr(source, "indices", np.arange(len(source)))
  pieces = []
  saved = {}
  dots_only = None  # the model's XLA:CPU choice, traced once per set
  logging.info(
      "AutoAttack (%s) on %d images, %d at a time in batches of %d "
      "(eval.autoattack.batch_size; a smaller remainder of robust points is "
      "padded by at most a quarter, to at least %d)",
      ", ".join(attacks_to_run or
                [version]), count, chunk, batch_size, attacks.MIN_PADDED_BATCH)
  started, last_line = time.perf_counter(), [time.perf_counter()]

  def progress(first, last):

    def report(attack, done, total):
      now = time.perf_counter()
      if now - last_line[0] >= PROGRESS_EVERY_S:
        last_line[0] = now
        logging.info("AutoAttack: %s %d/%d on images %d-%d of %d, %.0f s",
                     attack, done, total, first, last - 1, count, now - started)

    return report

  for first in range(0, count, chunk):
    rows = np.arange(first, min(first + chunk, count))
    images, labels = source.get_batch(rows)
    x = images.astype(np.float32) / 255.0
    if dots_only is None:
      dots_only = attacks.reduces_over_features(lambda v: logits_fn(params, v),
                                                x[:1])
    run = attacks.autoattack(logits_fn,
                             key,
                             x,
                             labels,
                             params=params,
                             eps=eps,
                             norm=norm,
                             version=version,
                             attacks_to_run=attacks_to_run,
                             batch_size=batch_size,
                             verbose=True,
                             progress=progress(first, rows[-1] + 1),
                             first_index=first,
                             gather_adversarial=save_adversarial,
                             placement=autoattack_placement(),
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
        entry["indices"].append(test_indices[rows[broken]])
        entry["images"].append(run.adv_images[broken])
        entry["labels"].append(np.asarray(labels)[broken])
        robust_before = after
    # The flags and counts only: a chunk's images (12 MB at 32 px, 600 MB
    # at 224) would otherwise stay for the whole set.
    pieces.append(dataclasses.replace(run, adv_images=None))
  combined = attacks.combine_results(pieces)
  if save_adversarial and output_dir and jax.process_index() == 0:
    results.write_adversarial(output_dir, saved, eps=eps, norm=norm)
  return combined

r"""Parity of our AutoAttack with the reference one (fra31's, `pyautoattack`).

One small model, defined identically in JAX and PyTorch, on the
scikit-learn digits (8x8, 3 channels): an MLP (the PyTorch copy takes the
JAX weights as NumPy arrays) or, with --model=vit, a 2-block DeiT-style ViT
(the PyTorch side is timm's, loaded from `pretrained.export_timm`).
It is adversarially trained with `vitat_jax.attacks.perturb` so that it is
actually robust; then both AutoAttacks (--version, "standard" by default)
on the same images, the robust accuracy after each attack side by side, and
the wall time of each.

    python -m benchmarks.autoattack_parity                 # all 1797 digits
    python -m benchmarks.autoattack_parity --num_images=500
    python -m benchmarks.autoattack_parity --version=plus --num_images=500
    python -m benchmarks.autoattack_parity --model=vit --num_images=500
    python -m benchmarks.autoattack_parity --version=rand --num_images=500

`--model=export --export=DIR` attacks a trained run's exported model
(`main.py --mode=export` writes DIR = <workdir>/export: timm weights and
their card) on the first --num_images CIFAR-10 test images of
--data_root (the image folder, classes in turn), at --eps; the PyTorch side
is timm's model loaded from the same file, our side `vitat_jax.load_model`
of it. benchmarks/NOTES.md ("AutoAttack on a DeiT-Ti-sized ViT") trains one
(`scripts/autoattack_model.sh`) and compares on it:

    python -m benchmarks.autoattack_parity --model=export \
        --export=/tmp/aa_run/export --num_images=200 --eps=0.0157

`--version=rand` attacks a randomised copy of the MLP on both sides: Gaussian
noise of std NOISE_STD added to the input at every call (`jax.random` keyed
by the attack on ours, `torch.randn` on fra31's), so the two draw different
noise and agree in distribution only.

`tests/attacks/test_autoattack.py` runs the same comparison on 500 images.

Run from the repository root, as a module (`python -m benchmarks.autoattack_parity`):
the checkout's `vitat_jax` then import without a path set up here.
"""

import argparse
import logging
import os
import pickle
import re
import sys
import tempfile
import time
from typing import Dict, Tuple


def _cpu_devices_from_argv():
  """--cpu_devices=K must reach XLA before JAX starts."""
  for arg in sys.argv[1:]:
    if arg.startswith("--cpu_devices="):
      count = int(arg.split("=", 1)[1])
      if count > 1:
        os.environ["XLA_FLAGS"] = " ".join(
            filter(None, [
                os.environ.get("XLA_FLAGS", ""),
                f"--xla_force_host_platform_device_count={count}"
            ]))


_cpu_devices_from_argv()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitat_jax import attacks
from vitat_jax import models

EPS = 0.1
NOISE_STD = 0.05  # the randomised model of --version=rand
HIDDEN = 64
NUM_CLASSES = 10


def digits() -> Tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as [N, 8, 8, 3] float32 in [0, 1], and labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)
  return np.repeat(images[..., None], 3, axis=-1), data.target.astype(np.int32)


def mlp_logits(params, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def init_mlp(k1, k2, dim):
  return {
      "w1": jax.random.normal(k1, (dim, HIDDEN)) * np.sqrt(2 / dim),
      "b1": jnp.zeros(HIDDEN),
      "w2": jax.random.normal(k2, (HIDDEN, NUM_CLASSES)) * np.sqrt(1 / HIDDEN),
      "b2": jnp.zeros(NUM_CLASSES)
  }


def tiny_vit():
  """A 2-block DeiT-style ViT on the 8x8 digits (patch 2: 16 tokens + cls)."""
  return models.create("deit_tiny_patch16_224", **VIT_KWARGS)


VIT_KWARGS = dict(num_classes=NUM_CLASSES,
                  img_size=8,
                  patch_size=2,
                  embed_dim=32,
                  depth=2,
                  num_heads=2)


def vit_logits(params, x):
  return tiny_vit().apply({"params": params}, x)


def train_robust(logits_fn,
                 params,
                 images,
                 labels,
                 attack_key,
                 *,
                 eps=EPS,
                 steps=300,
                 lr=3e-3,
                 batch_size=None):
  """PGD-AT (PGD-5, step eps / 2) with Adam; full batch unless batch_size."""
  optimizer = optax.adam(lr)
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, opt_state, key, x, y):
    objective = lambda xa, _: attacks.cross_entropy_per_example(
        logits_fn(params, xa), y).mean()
    x_adv = attacks.perturb(objective, key, x, eps=eps, alpha=eps / 2, steps=5)
    loss_fn = lambda p: attacks.cross_entropy_per_example(
        logits_fn(p, x_adv), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  for i in range(steps):
    rows = (slice(None) if batch_size is None else rng.choice(
        len(images), batch_size, replace=False))
    params, opt_state, _ = step(params, opt_state,
                                jax.random.fold_in(attack_key, i),
                                jnp.asarray(images[rows]),
                                jnp.asarray(labels[rows]))
  return jax.tree.map(np.asarray, params)


def train_robust_mlp(images, labels, *, eps=EPS, steps=300, seed=0):
  """The MLP, adversarially trained in a few seconds."""
  k1, k2, attack_key = jax.random.split(jax.random.key(seed), 3)
  params = init_mlp(k1, k2, int(np.prod(images.shape[1:])))
  return train_robust(mlp_logits,
                      params,
                      images,
                      labels,
                      attack_key,
                      eps=eps,
                      steps=steps)


def train_robust_vit(images, labels, *, eps=EPS, steps=2000, seed=0):
  """The tiny ViT, adversarially trained on mini-batches."""
  init_key, attack_key = jax.random.split(jax.random.key(seed))
  params = jax.jit(tiny_vit().init)(init_key, jnp.asarray(images[:1]))["params"]
  return train_robust(vit_logits,
                      params,
                      images,
                      labels,
                      attack_key,
                      eps=eps,
                      steps=steps,
                      lr=2e-3,
                      batch_size=128)


def cifar_test_images(root: str, count: int, first: int = 0):
  """`count` test images of the CIFAR-10 image folder `root`
  (root/test/<class>/*.jpg) from row `first` on, taking the classes in turn
  (class c's k-th image is row 10 k + c), as [N, 32, 32, 3] float32 in
  [0, 1], and labels (fewer at the end of the split)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  test = os.path.join(root, "test")
  classes = sorted(os.listdir(test))
  files = [sorted(os.listdir(os.path.join(test, c))) for c in classes]
  end = min(first + count, len(classes) * min(map(len, files)))
  images, labels = [], []
  for row in range(first, end):
    label, index = row % len(classes), row // len(classes)
    with Image.open(os.path.join(test, classes[label],
                                 files[label][index])) as image:
      images.append(np.asarray(image.convert("RGB"), np.float32) / 255)
    labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)


def first_correct(logits_fn, params, root: str, count: int):
  """The first `count` test images of `root` (`cifar_test_images`) that the
  model classifies correctly (a set whose cost is the attacks', not the
  clean check's), read and classified 500 at a time until there are
  enough."""
  predict = jax.jit(lambda x: jnp.argmax(logits_fn(params, x), -1))
  kept_images, kept_labels, found = [], [], 0
  for first in range(0, 10_000, 500):
    images, labels = cifar_test_images(root, 500, first)
    right = np.asarray(predict(images)) == labels
    kept_images.append(images[right])
    kept_labels.append(labels[right])
    found += int(right.sum())
    if found >= count or len(images) < 500:
      break
  return (np.concatenate(kept_images)[:count],
          np.concatenate(kept_labels)[:count])


def load_export(directory: str):
  """(logits_fn(params, x), params, PyTorch model) of the model that
  `main.py --mode=export` wrote to `directory`: ours through
  `vitat_jax.load_model`, timm's from the same weights and card, both
  taking [0, 1] pixels (the timm model normalised as the card says)."""
  import json  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import vitat_jax  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "model_card.json")) as f:
    card = json.load(f)
  weights = os.path.join(directory, card["weights"])
  loaded = vitat_jax.load_model(weights)
  model = loaded.model
  net = timm.create_model(card["timm"]["name"],
                          pretrained=False,
                          **card["timm"]["kwargs"])
  net.load_state_dict(safetensors.torch.load_file(weights), strict=True)
  torch_model = normalized_torch(net, card["input"]["mean"],
                                 card["input"]["std"])
  logits_fn = lambda params, x: model.apply({"params": params}, x)
  return logits_fn, jax.tree.map(np.asarray, loaded.params), torch_model


_COMPILE_SECONDS = [0.0, 0]  # XLA compilation: seconds, programs


def _count_compilation(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_SECONDS[0] += duration
    _COMPILE_SECONDS[1] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compilation_so_far() -> Tuple[float, int]:
  """(seconds, programs) XLA has compiled in this process so far."""
  return _COMPILE_SECONDS[0], _COMPILE_SECONDS[1]


def run_ours(params,
             images,
             labels,
             *,
             eps=EPS,
             seed=0,
             batch_size=500,
             version="standard",
             logits_fn=mlp_logits,
             stochastic=False,
             placement=None,
             with_seconds=False) -> Dict[str, float]:
  result = attacks.autoattack(logits_fn,
                              jax.random.key(seed),
                              images,
                              labels,
                              params=params,
                              eps=eps,
                              batch_size=batch_size,
                              version=version,
                              stochastic=stochastic,
                              placement=placement,
                              verbose=False)
  if with_seconds:
    return result.robust_accuracy, result.seconds
  return result.robust_accuracy


class _Capture(logging.Handler):
  """Collects the reference's per-attack accuracies from its debug log
  (`run_standard_evaluation` returns only the adversarial images)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.accuracy = {}
    self.total_time = {}

  def emit(self, record):
    message = record.getMessage()
    match = re.match(
        r"robust accuracy after (\S+): ([\d.]+)%"
        r"(?: \(total time ([\d.]+) s\))?", message)
    if match:
      self.accuracy[match.group(1).lower()] = float(match.group(2)) / 100
      if match.group(3):
        self.total_time[match.group(1).lower()] = float(match.group(3))
    match = re.match(r"initial accuracy: ([\d.]+)%", message)
    if match:
      self.accuracy["clean"] = float(match.group(1)) / 100


def torch_mlp(params):
  """The same MLP in PyTorch, on NCHW input, with the JAX weights."""
  import torch  # pylint: disable=g-import-not-at-top

  class Mlp(torch.nn.Module):

    def __init__(self):
      super().__init__()
      for name, value in params.items():
        self.register_buffer(name, torch.from_numpy(np.array(value)))

    def forward(self, x):
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # as JAX's NHWC
      h = torch.relu(x @ self.w1 + self.b1)
      return h @ self.w2 + self.b2

  return Mlp().eval()


def noisy_mlp_logits(params, x, key):
  """The randomised MLP: fresh input noise at every call."""
  return mlp_logits(params, x + NOISE_STD * jax.random.normal(key, x.shape))


def torch_noisy(module):
  """`module` with fresh Gaussian input noise at every call."""
  import torch  # pylint: disable=g-import-not-at-top

  class Noisy(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.inner = module

    def forward(self, x):
      return self.inner(x + NOISE_STD * torch.randn_like(x))

  return Noisy().eval()


def normalized_torch(net, mean, std):
  """`net` (a timm model: normalised NCHW input) taking [0, 1] pixels, as
  this library's models do, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top

  class Normalized(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.net = net
      self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
      return self.net((x - self.mean) / self.std)

  return Normalized().eval()


def torch_vit(params, directory):
  """timm's DeiT with the JAX weights (through `pretrained.export_timm`),
  normalising its [0, 1] NCHW input as the JAX model does."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  from vitat_jax import pretrained  # pylint: disable=g-import-not-at-top
  model = tiny_vit()
  path = os.path.join(directory, "tiny_vit.safetensors")
  pretrained.export_timm(params, model, path)
  vit = timm.create_model("deit_tiny_patch16_224",
                          pretrained=False,
                          **VIT_KWARGS)
  vit.load_state_dict(safetensors.torch.load_file(path), strict=True)
  return normalized_torch(vit, model.mean, model.std)


def run_reference(params,
                  images,
                  labels,
                  *,
                  eps=EPS,
                  seed=0,
                  batch_size=500,
                  version="standard",
                  torch_model=None,
                  torch_threads=1) -> Dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
  torch_model = torch_mlp(params) if torch_model is None else torch_model
  adversary = AutoAttack(torch_model,
                         eps=eps,
                         norm="Linf",
                         version=version,
                         seed=seed,
                         device="cpu")
  capture = _Capture()
  logger = adversary.logger
  old_level, old_threads = logger.level, torch.get_num_threads()
  logger.addHandler(capture)
  logger.setLevel(logging.DEBUG)
  # One thread for the MLP: on its tiny matmuls PyTorch's per-op thread
  # hand-off costs more than the work (10x slower with 2 threads here).
  torch.set_num_threads(torch_threads)
  try:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
  finally:
    logger.removeHandler(capture)
    logger.setLevel(old_level)
    torch.set_num_threads(old_threads)
  with torch.no_grad():
    final = (adversary.model(x_adv).argmax(1) == y).float().mean().item()
  accuracy = capture.accuracy
  accuracy["final_checked"] = final
  # The reference logs the time since its start after each attack.
  previous = 0.0
  for name, total in capture.total_time.items():
    accuracy[f"{name}_s"], previous = total - previous, total
  return accuracy


def _digits_params(args, images, labels):
  """The digits model's weights: read from --params_cache, else trained
  (and written there)."""
  if args.params_cache and os.path.exists(args.params_cache):
    with open(args.params_cache, "rb") as f:
      params = pickle.load(f)
    print(f"{args.model} weights read from {args.params_cache}")
    return params
  start = time.perf_counter()
  train = {"mlp": train_robust_mlp, "vit": train_robust_vit}[args.model]
  params = train(images, labels, eps=args.eps)
  print(f"{args.model} trained in {time.perf_counter() - start:.1f} s")
  if args.params_cache:
    with open(args.params_cache, "wb") as f:
      pickle.dump(params, f)
  return params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=1797)
  parser.add_argument("--eps", type=float, default=EPS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--model",
                      default="mlp",
                      choices=["mlp", "vit", "export"])
  parser.add_argument("--export",
                      default="",
                      help="--model=export: a run's export directory")
  parser.add_argument("--correct_only",
                      action="store_true",
                      help="--model=export: the first --num_images test "
                      "images the model classifies correctly")
  parser.add_argument(
      "--data_root",
      default=os.path.expanduser("~/.cache/vitat_jax/cifar10-jpeg/cifar10"),
      help="--model=export: the CIFAR-10 image folder")
  parser.add_argument("--torch_threads",
                      default="",
                      help="comma-separated PyTorch thread counts for fra31, "
                      "each run in turn, the fastest compared (default: 1 "
                      "for the MLP, 1,2 for the ViT)")
  parser.add_argument("--cpu_devices",
                      type=int,
                      default=1,
                      help="CPU devices for ours (the batch is sharded "
                      "over them); read before JAX starts")
  parser.add_argument("--params_cache",
                      default="",
                      help="a pickle of the trained weights: loaded if it "
                      "exists, else written (saves the training in reruns)")
  parser.add_argument("--ours_devices",
                      default="",
                      help="comma-separated device counts to run ours on, "
                      "each in turn (at most --cpu_devices; default: all)")
  parser.add_argument("--no_compiled_rerun",
                      action="store_true",
                      help="skip ours' second, compiled run")
  parser.add_argument("--ours_only",
                      action="store_true",
                      help="time ours only (no fra31, no comparison)")
  parser.add_argument("--version",
                      default="standard",
                      choices=["standard", "plus", "rand"])
  args = parser.parse_args()
  if args.version == "rand" and args.model != "mlp":
    parser.error("--version=rand attacks the randomised MLP: drop --model")
  if (args.model == "export") != bool(args.export):
    parser.error("--export=DIR goes with --model=export (and only with it)")
  start = time.perf_counter()
  if args.model == "export":
    logits_fn, params, torch_model = load_export(args.export)
    if args.correct_only:
      images, labels = first_correct(logits_fn, params, args.data_root,
                                     args.num_images)
    else:
      images, labels = cifar_test_images(args.data_root, args.num_images)
    print(f"{args.export} loaded, {len(images)} CIFAR-10 test images read in "
          f"{time.perf_counter() - start:.1f} s")
  else:
    images, labels = digits()
    params = _digits_params(args, images, labels)
    images, labels = images[:args.num_images], labels[:args.num_images]
    logits_fn = {"mlp": mlp_logits, "vit": vit_logits}[args.model]
    with tempfile.TemporaryDirectory() as directory:
      torch_model = (torch_vit(params, directory)
                     if args.model == "vit" else torch_mlp(params))
  stochastic = args.version == "rand"
  if stochastic:
    logits_fn, torch_model = noisy_mlp_logits, torch_noisy(torch_model)
  common = dict(eps=args.eps,
                seed=args.seed,
                batch_size=args.batch_size,
                version=args.version)
  counts = ([int(k) for k in args.ours_devices.split(",")]
            if args.ours_devices else [jax.device_count()])
  if max(counts) > jax.device_count():
    parser.error(f"--ours_devices={args.ours_devices} but --cpu_devices="
                 f"{jax.device_count()}")
  ours = {}  # device count -> (accuracies, seconds, total, compile, compiled)
  for count in counts:
    placement = attacks.Placement(devices=jax.local_devices()[:count])
    run = lambda: run_ours(params,
                           images,
                           labels,
                           logits_fn=logits_fn,
                           stochastic=stochastic,
                           placement=placement,
                           with_seconds=True,
                           **common)
    compiled_before = compilation_so_far()
    start = time.perf_counter()
    accuracy, seconds = run()
    total = time.perf_counter() - start
    compiling = tuple(
        now - before
        for now, before in zip(compilation_so_far(), compiled_before))
    warm = None
    if not args.no_compiled_rerun:  # what a second evaluation costs
      start = time.perf_counter()
      warm = (*run(), time.perf_counter() - start)
    ours[count] = (accuracy, seconds, total, compiling, warm)
  for count, (accuracy, seconds, total, (compile_s, programs),
              warm) in ours.items():
    print(f"ours on {count} CPU device(s): {total:.1f} s including "
          f"compilation ({compile_s:.1f} s compiling {programs} XLA programs)" +
          (f", {warm[2]:.1f} s compiled" if warm else ""))
    for name in attacks.VERSIONS[args.version]:
      print(
          f"  {name:10s} {100 * accuracy[name]:9.2f}% {seconds[name]:8.1f} s" +
          (f" ({warm[1][name]:.1f} s compiled)" if warm else ""))
  if args.ours_only:
    return
  threads = [
      int(t) for t in (args.torch_threads or {
          "mlp": "1",
          "vit": "1,2",
          "export": "2"
      }[args.model]).split(",")
  ]
  references = {}
  for count in threads:
    start = time.perf_counter()
    result = run_reference(params,
                           images,
                           labels,
                           torch_model=torch_model,
                           torch_threads=count,
                           **common)
    references[count] = (result, time.perf_counter() - start)
  best = min(references, key=lambda t: references[t][1])
  theirs, theirs_s = references[best]
  what = "CIFAR-10 images" if args.model == "export" else "digits"
  print(f"{args.model}, {len(images)} {what}, eps={args.eps}, version "
        f"{args.version}, fra31 with {best} thread(s) (fastest of {threads})")
  head = "".join(f" {f'ours {k} dev':>11s}" for k in ours)
  print(f"{'after':10s} {'fra31':>10s}{head} (robust accuracy; seconds)")
  for name in ("clean", *attacks.VERSIONS[args.version]):
    row = f"{name:10s} {100 * theirs[name]:9.2f}%"
    row += "".join(f" {100 * ours[k][0][name]:10.2f}%" for k in ours)
    if name != "clean":
      row += f"   {theirs.get(name + '_s', float('nan')):7.1f}"
      row += "".join(f" {ours[k][1][name]:7.1f}" for k in ours)
    print(row)
  for count, (_, seconds) in sorted(references.items()):
    print(f"fra31 with {count} PyTorch thread(s): {seconds:.1f} s")
  for count, (_, _, total, _, warm) in ours.items():
    print(f"speed-up over fra31 on {count} CPU device(s): "
          f"{theirs_s / total:.2f}x including compilation" +
          (f", {theirs_s / warm[2]:.2f}x compiled" if warm else ""))


if __name__ == "__main__":
  main()

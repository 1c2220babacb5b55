r"""The adversarial-training step on whatever accelerator is here, against the
reference's PyTorch step on the same device.

Two cases, ARD and PRM on, the paper's recipe otherwise (SGD, clipping,
Mixup/CutMix as configs/imagenet.py and configs/cifar10.py set them):

  (a) ViT-B/16 at 224 px, PGD-5 AT (the ImageNet recipe's step);
  (b) ViT-B/4 at 32 px, PGD-10 AT (the CIFAR-10 recipe's step).

For each: images/s, model-FLOP utilisation against the device's peak (the
table PEAK_TFLOPS; on a CPU the measured float32 matmul rate), the analytic
FLOP count and XLA's (`cost_analysis()`, the attack loop's body scaled by its
steps) and their ratio, compile time and peak device memory, in bfloat16 and
in float32 at the backend's default and at the highest matmul precision.
Then the same step written the reference's way in PyTorch + timm (eager;
FP32, TF32 on CUDA, AMP-bf16) on the same device, the input pipeline
(grain workers decoding a JPEG folder at the case's size) against the step's
rate, and AutoAttack against fra31's (`pyautoattack`) on the same device.

    python -m benchmarks.accelerator                 # full size (sized for 8 min on an H100; not yet run on one)
    python -m benchmarks.accelerator --tiny          # every part, toy sizes, CPU, < 1 min
    python -m benchmarks.accelerator --cases=b --parts=step,torch --repeats=3

A GPU machine with Python 3.12, jax (CUDA), flax, optax, orbax-checkpoint,
chex, torch, timm and safetensors needs these wheels besides (all pure
Python or manylinux, no internet needed once copied): ml-collections, absl-py,
grain, array-record, etils, tensorflow-datasets (its data_source only),
pyautoattack, pillow, numpy (present with jax), and this checkout.

Run from the repository root, as a module: the checkout's `vitat_jax`,
`configs` and `benchmarks` then import without a path set up here. Numbers
measured are in docs/performance.md and benchmarks/NOTES.md.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional

# pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10
from configs import imagenet
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import state as state_lib
from vitat_jax import train_step as train_step_lib

# Dense peak TFLOP/s per device: (bfloat16, float32 at the default precision,
# float32 at highest). GPUs: NVIDIA's data sheets (SXM, no sparsity; default
# float32 = TF32 tensor cores). TPUs: Google's bf16 peak; float32 at the
# default precision is one bf16 pass, at highest six (JAX's docs).
PEAK_TFLOPS = {
    "H200": (989.0, 494.5, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.5, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L4": (121.0, 60.0, 30.3),
    "TPU v4": (275.0, 275.0, 275.0 / 6),
    "TPU v5 lite": (197.0, 197.0, 197.0 / 6),
    "TPU v5p": (459.0, 459.0, 459.0 / 6),
    "TPU v6 lite": (918.0, 918.0, 918.0 / 6),
}
# (compute dtype, matmul precision): bfloat16; float32 at the backend's
# default (TF32 on recent GPUs); float32 at highest (true float32).
PRECISIONS = (("bfloat16", "default"), ("float32", "default"), ("float32",
                                                                "highest"))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  title: str
  image_size: int
  patch_size: int
  attack_steps: int
  batch_size: int
  num_classes: int
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0

  @property
  def tokens(self) -> int:
    return (self.image_size // self.patch_size)**2 + 1


CASES = {
    "a": Case("a", "ViT-B/16, 224 px, PGD-5 AT", 224, 16, 5, 64, 1000),
    "b": Case("b", "ViT-B/4, 32 px, PGD-10 AT", 32, 4, 10, 128, 10),
}


def tiny(case: Case) -> Case:
  """The same step at toy width and depth, for --tiny."""
  return dataclasses.replace(case,
                             image_size=min(case.image_size, 64),
                             batch_size=2,
                             attack_steps=2,
                             embed_dim=32,
                             depth=2,
                             num_heads=2,
                             num_classes=10)


def analytic_flops(case: Case) -> Dict[str, float]:
  """Multiply-adds x 2 of one image: the forward pass F, an attack
  iteration (F and the gradient to the input: every matmul once more, the
  two attention products twice more) and a training step's update (F and
  the gradients to activations and weights; none to the pixels)."""
  n, d = case.tokens, case.embed_dim
  hidden = int(case.mlp_ratio * d)
  # The last block computes the class token alone (`layers.Block.outputs`):
  # its qkv projection sees every token, the rest only the class token.
  linear = ((case.depth - 1) * 2 * n * (4 * d * d + 2 * d * hidden) +
            2 * n * 3 * d * d + 2 * (d * d + 2 * d * hidden))
  attention = (case.depth - 1) * 2 * 2 * n * n * d + 2 * 2 * n * d
  patch = 2 * (n - 1) * case.patch_size**2 * 3 * d
  head = 2 * d * case.num_classes
  forward = linear + attention + patch + head
  attack_iteration = forward + (linear + 2 * attention + patch + head)
  update = forward + 2 * (linear + head) + 2 * attention + patch
  return {
      "forward": forward,
      "step": case.attack_steps * attack_iteration + update,
  }


def make_config(case: Case, compute_dtype: str, matmul_precision: str):
  arg = "model=vit_base_patch16_224,ard_prm=True,pretrained=scratch"
  if case.image_size > 64:
    config = imagenet.get_config(arg)
  else:
    config = cifar10.get_config(arg)
  config.model.patch_size = case.patch_size
  config.model.embed_dim = case.embed_dim
  config.model.depth = case.depth
  config.model.num_heads = case.num_heads
  config.data.image_size = case.image_size
  config.tricks.prm_patch_size = case.patch_size
  config.attack.steps = case.attack_steps
  config.batch_size = case.batch_size
  config.compute_dtype = compute_dtype
  config.matmul_precision = matmul_precision
  return config


def _xla_flops(lowered) -> float:
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _device_peak_bytes() -> Optional[float]:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return float(peak) if peak is not None else None


def _timed_repeats(fn: Callable[[], None], repeats: int) -> float:
  """Median seconds of `repeats` calls after one untimed warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_step(case: Case,
             compute_dtype: str,
             matmul_precision: str,
             repeats: int,
             count_only: bool = False) -> Dict[str, float]:
  """The training step as `train.py` runs it, on one device's batch
  (`count_only`: lowered and counted, not compiled or run)."""
  config = make_config(case, compute_dtype, matmul_precision)
  inputs = state_lib.ModelInputs(case.image_size, case.num_classes,
                                 (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
  model = state_lib.build_model(config, inputs=inputs)
  steps_per_epoch = 1000
  tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                      steps_per_epoch, config.model.name)
  key = jax.random.key(0)
  mesh = parallel.make_mesh(num_devices=1)
  state = state_lib.initial_state(config, model, tx, key)
  state = parallel.replicate(mesh, state)
  rng = np.random.default_rng(0)
  images = rng.integers(0,
                        256,
                        (case.batch_size, case.image_size, case.image_size, 3),
                        dtype=np.uint8)
  labels = rng.integers(0, case.num_classes, case.batch_size, dtype=np.int32)
  images, labels = parallel.shard_global_batch(mesh, (images, labels))

  def build(method):
    config.method = method
    return jax.jit(train_step_lib.make_train_step(
        config, model, objectives.make_objective(config, model), tx, schedule,
        steps_per_epoch, case.num_classes),
                   donate_argnums=0)

  natural = build("natural").lower(state, images, labels, key)
  step = build("at")
  lowered = step.lower(state, images, labels, key)
  # XLA counts a loop's body once: the attack's share is (AT - natural),
  # times its iterations.
  natural_flops, at_flops = _xla_flops(natural), _xla_flops(lowered)
  xla_flops = natural_flops + case.attack_steps * (at_flops - natural_flops)
  analytic = analytic_flops(case)["step"] * case.batch_size
  if count_only:
    return {"analytic_tflop": analytic / 1e12, "xla_tflop": xla_flops / 1e12}
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  compiled_bytes = (float("nan")
                    if memory is None else memory.argument_size_in_bytes +
                    memory.output_size_in_bytes + memory.temp_size_in_bytes -
                    memory.alias_size_in_bytes)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], images, labels, key)
    jax.block_until_ready(metrics)

  seconds = _timed_repeats(run, repeats)
  return {
      "seconds": seconds,
      "images_per_s": case.batch_size / seconds,
      "analytic_tflop": analytic / 1e12,
      "xla_over_analytic": xla_flops / analytic,
      "achieved_tflops": analytic / seconds / 1e12,
      "compile_s": compile_s,
      "compiled_gib": compiled_bytes / 2**30,
      "device_peak_gib": (_device_peak_bytes() or float("nan")) / 2**30,
  }


def cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
  """The measured float32 matmul rate: the CPU's peak for the utilisation."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  seconds = _timed_repeats(lambda: mm(a, a).block_until_ready(), repeats)
  return 2 * n**3 / seconds / 1e12


def peak_tflops(compute_dtype: str, matmul_precision: str,
                cpu_peak: float) -> Optional[float]:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak
  for kind, peaks in PEAK_TFLOPS.items():
    if kind in device.device_kind:
      if compute_dtype == "bfloat16":
        return peaks[0]
      return peaks[2] if matmul_precision == "highest" else peaks[1]
  return None


class TorchStep:
  """The reference's AT step on timm's ViT, eager: PGD with PRM's mask on
  the perturbation and ARD's gradient gate on each attention branch, then a
  clipped SGD update, in FP32, TF32 or AMP-bf16."""

  def __init__(self, case: Case, mode: str, device: str):
    import timm
    import torch
    self.torch, self.mode, self.case = torch, mode, case
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    self.device = device
    self.model = timm.create_model("vit_base_patch16_224",
                                   pretrained=False,
                                   num_classes=case.num_classes,
                                   img_size=case.image_size,
                                   patch_size=case.patch_size,
                                   embed_dim=case.embed_dim,
                                   depth=case.depth,
                                   num_heads=case.num_heads).to(device)
    self.keep = torch.ones(case.depth, device=device)
    for i, block in enumerate(self.model.blocks):
      block.attn.register_forward_hook(self._gate(i))
    self.opt = torch.optim.SGD(self.model.parameters(),
                               lr=0.1,
                               momentum=0.9,
                               weight_decay=1e-4)
    size, cells = case.image_size, case.image_size // case.patch_size
    self.x = torch.rand(case.batch_size, 3, size, size, device=device)
    self.y = torch.randint(0,
                           case.num_classes, (case.batch_size,),
                           device=device)
    cell = torch.rand(case.batch_size, 1, cells, cells, device=device) < 0.5
    self.prm = cell.float().repeat_interleave(case.patch_size, 2)
    self.prm = self.prm.repeat_interleave(case.patch_size, 3)

  def _gate(self, index):

    def hook(module, args, output):
      del module, args
      keep = self.keep[index]
      return keep * output + (1 - keep) * output.detach()

    return hook

  def _autocast(self):
    return self.torch.autocast(self.device.split(":")[0],
                               dtype=self.torch.bfloat16,
                               enabled=self.mode == "amp-bf16")

  def run(self):
    torch, f = self.torch, self.torch.nn.functional
    eps, alpha = 8 / 255, 2 / 255
    self.keep = (torch.rand(self.case.depth, device=self.device) < 0.5).float()
    self.model.eval()
    delta = torch.empty_like(self.x).uniform_(-eps, eps) * self.prm
    for _ in range(self.case.attack_steps):
      delta.requires_grad_(True)
      with self._autocast():
        loss = f.cross_entropy(self.model(self.x + delta), self.y)
      grad, = torch.autograd.grad(loss, delta)
      delta = (delta.detach() + alpha * grad.sign() * self.prm).clamp(-eps, eps)
      delta = torch.max(torch.min(delta, 1 - self.x), -self.x)
    self.keep = torch.ones(self.case.depth, device=self.device)
    self.model.train()
    with self._autocast():
      loss = f.cross_entropy(self.model(self.x + delta), self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    if self.device.startswith("cuda"):
      torch.cuda.synchronize()


def torch_step(case: Case, mode: str, repeats: int) -> Dict[str, float]:
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  step = TorchStep(case, mode, device)
  seconds = _timed_repeats(step.run, repeats)
  return {"seconds": seconds, "images_per_s": case.batch_size / seconds}


def _jpeg_folder(root: str, count: int, size: int, classes: int = 4):
  """`count` smooth random JPEGs per split, ImageNet-like sizes for 224."""
  from PIL import Image
  import pathlib
  rng = np.random.default_rng(0)
  width, height = (500, 375) if size > 64 else (size, size)
  for split in ("train", "test"):
    for i in range(count):
      folder = pathlib.Path(root, split, f"class{i % classes}")
      folder.mkdir(parents=True, exist_ok=True)
      low = rng.integers(0,
                         256, (height // 8 + 1, width // 8 + 1, 3),
                         dtype=np.uint8)
      image = Image.fromarray(low).resize((width, height), Image.BILINEAR)
      image.save(folder / f"{i}.jpg", quality=90)


def pipeline_rate(case: Case, workers: int, batches: int) -> float:
  """Images/s of the training input path (decode, transform, batch)."""
  from benchmarks import input_pipeline
  batch_size = min(case.batch_size, 32)
  with tempfile.TemporaryDirectory() as root:
    _jpeg_folder(root, max(batch_size * 4, 16), case.image_size)
    result = input_pipeline.run(
        root,
        case.image_size,
        workers,
        batches,
        batch_size,
        ("random_resized_crop" if case.image_size > 64 else "squash"),
        warmup=1)
  return result["rate"]


def autoattack_ratio(num_images: int,
                     train_steps: int,
                     attacks_to_run=None,
                     n_iter: Optional[int] = None) -> Dict[str, float]:
  """Ours against fra31's on the same device and images: the adversarially
  trained digits ViT of benchmarks.autoattack_parity (timm's copy for
  fra31). Seconds include our compilation; robust accuracy after the last
  attack on each side."""
  import logging
  import torch
  from pyautoattack import AutoAttack
  from benchmarks import autoattack_parity as parity
  from vitat_jax import attacks
  images, labels = parity.digits()
  params = parity.train_robust_vit(images, labels, steps=train_steps)
  images, labels = images[:num_images], labels[:num_images]
  start = time.perf_counter()
  ours = attacks.autoattack(parity.vit_logits,
                            jax.random.key(0),
                            images,
                            labels,
                            params=params,
                            eps=parity.EPS,
                            version="custom" if attacks_to_run else "standard",
                            attacks_to_run=attacks_to_run,
                            overrides=({
                                "apgd-ce": {
                                    "n_iter": n_iter
                                }
                            } if n_iter else None),
                            batch_size=num_images,
                            verbose=False)
  ours_s = time.perf_counter() - start
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with tempfile.TemporaryDirectory() as directory:
    torch_model = parity.torch_vit(params, directory).to(device)
  adversary = AutoAttack(torch_model,
                         eps=parity.EPS,
                         norm="Linf",
                         seed=0,
                         device=device,
                         version="custom" if attacks_to_run else "standard")
  if attacks_to_run:
    adversary.attacks_to_run = list(attacks_to_run)
  if n_iter:
    adversary.apgd.n_iter = n_iter
  adversary.logger.setLevel(logging.WARNING)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))
  start = time.perf_counter()
  x_adv, _ = adversary.run_standard_evaluation(x.to(device),
                                               y.to(device),
                                               batch_size=num_images)
  theirs_s = time.perf_counter() - start
  with torch.no_grad():
    theirs = (torch_model(x_adv).argmax(1).cpu() == y).float().mean().item()
  last = list(ours.robust_accuracy)[-1]
  return {
      "ours_s": ours_s,
      "fra31_s": theirs_s,
      "ours_robust": ours.robust_accuracy[last],
      "fra31_robust": theirs,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny",
                      action="store_true",
                      help="every part at toy sizes (CPU, under a minute)")
  parser.add_argument("--cases", default="a,b")
  parser.add_argument("--parts",
                      default="step,torch,pipeline,autoattack",
                      help="any of step, torch, pipeline, autoattack and "
                      "flops (XLA's count against the analytic one, lowered "
                      "only: cheap at full size on any machine)")
  parser.add_argument("--precisions",
                      default="",
                      help="comma-separated dtype:precision pairs (default: "
                      "bfloat16:default,float32:default,float32:highest)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size",
                      type=int,
                      default=0,
                      help="per-device batch instead of the case's (64 for "
                      "(a), 128 for (b)), e.g. 8 on a CPU")
  parser.add_argument("--workers", type=int, default=8)
  args = parser.parse_args(argv)
  parts = set(args.parts.split(","))
  precisions = (PRECISIONS if not args.precisions else tuple(
      tuple(p.split(":")) for p in args.precisions.split(",")))
  repeats, workers = args.repeats, args.workers
  if args.tiny:
    repeats, workers = 1, 1
    if "torch" in parts:
      import torch
      # One thread: at toy sizes PyTorch's thread hand-offs cost more than
      # the work (and spin against other jobs on a shared CPU).
      torch.set_num_threads(1)
  device = jax.devices()[0]
  print(f"backend {jax.default_backend()}, device {device.device_kind} "
        f"x{jax.device_count()}, jax {jax.__version__}")
  cpu_peak = cpu_matmul_tflops(256 if args.tiny else 2048)
  if device.platform == "cpu":
    print(f"CPU peak for the utilisation: measured float32 matmul "
          f"{cpu_peak * 1e3:.0f} GFLOP/s")
  for name in args.cases.split(","):
    case = CASES[name]
    case = tiny(case) if args.tiny else case
    if args.batch_size:
      case = dataclasses.replace(case, batch_size=args.batch_size)
    flops = analytic_flops(case)
    print(f"\n({name}) {case.title}: width {case.embed_dim}, depth "
          f"{case.depth}, {case.tokens} tokens, batch {case.batch_size}; "
          f"analytic {flops['step'] / 1e9:.2f} GFLOP per image per step")
    jax_rate, jax_rates = None, {}  # best; by (dtype, precision)
    if "flops" in parts:
      for dtype, precision in precisions[:2]:
        r = jax_step(case, dtype, precision, repeats, count_only=True)
        print(f"  {dtype}: XLA {r['xla_tflop']:.3f} TFLOP, analytic "
              f"{r['analytic_tflop']:.3f} TFLOP per step: XLA / analytic "
              f"{r['xla_tflop'] / r['analytic_tflop']:.3f}")
    if "step" in parts:
      print(f"  {'dtype':9s} {'precision':9s} {'img/s':>9s} {'TFLOP/s':>8s} "
            f"{'MFU':>6s} {'XLA/analytic':>12s} {'compile s':>9s} "
            f"{'compiled GiB':>12s} {'device peak GiB':>15s}")
      # --tiny: one precision per case (bfloat16 for (a), float32 for (b)).
      for dtype, precision in ((precisions[0],)
                               if args.tiny and name == "a" else
                               (precisions[-1],) if args.tiny else precisions):
        r = jax_step(case, dtype, precision, repeats)
        peak = peak_tflops(dtype, precision, cpu_peak)
        mfu = (f"{100 * r['achieved_tflops'] / peak:5.1f}%"
               if peak else "   n/a")
        print(f"  {dtype:9s} {precision:9s} {r['images_per_s']:9.2f} "
              f"{r['achieved_tflops']:8.3f} {mfu:>6s} "
              f"{r['xla_over_analytic']:12.3f} {r['compile_s']:9.1f} "
              f"{r['compiled_gib']:12.3f} {r['device_peak_gib']:15.3f}")
        jax_rate = max(jax_rate or 0.0, r["images_per_s"])
        jax_rates[dtype, precision] = r["images_per_s"]
    if "torch" in parts:
      import torch
      modes = ["fp32", "amp-bf16"]
      if torch.cuda.is_available():
        modes.insert(1, "tf32")
      for mode in modes:
        r = torch_step(case, mode, repeats)
        # Like for like: FP32 against float32 at highest, TF32 against
        # float32 at the default (TF32 on GPUs), AMP against bfloat16.
        same = {
            "fp32": ("float32", "highest"),
            "tf32": ("float32", "default"),
            "amp-bf16": ("bfloat16", "default")
        }[mode]
        if device.platform == "cpu" and same not in jax_rates:
          same = (same[0], "default")  # the same on a CPU
        ratio = (f", JAX {same[0]}/{same[1]} / this "
                 f"{jax_rates[same] / r['images_per_s']:.2f}x"
                 if same in jax_rates else "")
        print(f"  PyTorch + timm {mode:8s} {r['images_per_s']:9.2f} img/s"
              f"{ratio}")
    if "pipeline" in parts:
      rate = pipeline_rate(case, workers, 2 if args.tiny else 20)
      feeds = (f" ({rate / jax_rate:.1f}x the best step's rate)"
               if jax_rate else "")
      print(f"  input pipeline, {workers} worker(s): {rate:.0f} img/s{feeds}")
  if "autoattack" in parts:
    r = autoattack_ratio(*((20, 50, ("apgd-ce",), 10) if args.tiny else (500,
                                                                         2000)))
    print(
        f"\nAutoAttack ({'APGD-CE' if args.tiny else 'standard'}), digits ViT, same device: ours "
        f"{r['ours_s']:.1f} s (compilation included), fra31 "
        f"{r['fra31_s']:.1f} s, {r['fra31_s'] / r['ours_s']:.2f}x; robust "
        f"{100 * r['ours_robust']:.1f}% against "
        f"{100 * r['fra31_robust']:.1f}%")


if __name__ == "__main__":
  main()

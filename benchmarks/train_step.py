r"""Speed of the adversarial-training step: JAX against the PyTorch reference.

Times one PGD-10 AT step (augmentation, attack, forward/backward, clipped SGD
update: `train_step.make_train_step` exactly as training runs it) and one PGD-20
evaluation step, in JAX and in a PyTorch re-implementation of the
reference's step on timm's model (same CPU, model, batch and budget), with
the two sides alternating and the medians reported. Also reports XLA's FLOP
count, achieved GFLOP/s against a measured matmul peak, compile time, XLA's
peak-memory estimate, and the input pipeline's throughput on CIFAR-10.

    python -m benchmarks.train_step                    # ViT-Ti, 32 px, patch 4, batch 32
    python -m benchmarks.train_step --repeats=7 --no_torch
    python -m benchmarks.train_step --cpu_devices=2    # batch split over 2 CPU devices
    python -m benchmarks.train_step --compute_dtype=bfloat16 --remat

PyTorch and timm are optional: without them only the JAX side runs.
Numbers measured on the development machine are in benchmarks/NOTES.md.

Run from the repository root, as a module (`python -m benchmarks.train_step`):
the checkout's `vitat_jax` and `configs` then import without a path set up here.
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import time

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10
from vitat_jax import attack_names
from vitat_jax import evaluation
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import parallel
from vitat_jax import state as state_lib
from vitat_jax import train_step as train_step_lib
from vitat_jax.data import pipeline

NUM_CLASSES = 10
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
_CIFAR10_FOLDER = os.path.expanduser("~/.cache/vitat_jax/cifar10-jpeg/cifar10")


def make_config(args):
  config = cifar10.get_config(f"model={args.model}")
  config.batch_size = args.batch_size
  config.attack.steps = args.attack_steps
  config.tricks.ard = args.ard
  config.tricks.prm = args.prm
  if hasattr(config, "compute_dtype"):
    config.compute_dtype = args.compute_dtype
  if "remat" in config.model:
    config.model.remat = args.remat
  return config


def _flops(staged) -> float:
  """XLA's FLOP count of a lowered or compiled function (loops counted once)."""
  cost = staged.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _peak_bytes(compiled) -> float:
  mem = compiled.memory_analysis()
  if mem is None:
    return float("nan")
  return float(mem.argument_size_in_bytes + mem.output_size_in_bytes +
               mem.temp_size_in_bytes - mem.alias_size_in_bytes)


class JaxSide:
  """The jitted AT step and PGD-20 step with their inputs, compiled once."""

  def __init__(self, args):
    config = make_config(args)
    self.model = state_lib.build_model(config).clone(num_classes=NUM_CLASSES,
                                                     img_size=32,
                                                     mean=CIFAR10_MEAN,
                                                     std=CIFAR10_STD)
    steps_per_epoch = 781
    tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                        steps_per_epoch, config.model.name)
    objective = objectives.make_objective(config, self.model)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(
        rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8))
    self.labels = jnp.asarray(
        rng.integers(0, NUM_CLASSES, args.batch_size, dtype=np.int32))
    params = jax.jit(self.model.init)(key, jnp.zeros((1, 32, 32, 3)))["params"]
    # As training places them: the state replicated over the device mesh,
    # the batch split along "data" (one device unless --cpu_devices > 1).
    mesh = parallel.make_mesh()
    parallel.check_batch_size(args.batch_size, mesh)
    self.num_devices = mesh.devices.size
    self.state = parallel.replicate(
        mesh,
        state_lib.TrainState(jnp.asarray(0, jnp.int32), params,
                             tx.init(params)))
    self.images, self.labels = parallel.shard_global_batch(
        mesh, (self.images, self.labels))
    step = jax.jit(train_step_lib.make_train_step(config, self.model, objective,
                                                  tx, schedule, steps_per_epoch,
                                                  NUM_CLASSES),
                   donate_argnums=0)
    start = time.perf_counter()
    self.train_step = step.lower(self.state, self.images, self.labels,
                                 key).compile()
    self.train_compile_s = time.perf_counter() - start
    self.key = key
    # XLA's cost analysis counts a while loop's body once, so the attack's
    # share is found as (AT step - natural step) and scaled by its steps.
    config.method = "natural"
    natural = jax.jit(
        train_step_lib.make_train_step(
            config, self.model, objectives.make_objective(config, self.model),
            tx, schedule, steps_per_epoch,
            NUM_CLASSES)).lower(self.state, self.images, self.labels, key)
    at_flops = _flops(step.lower(self.state, self.images, self.labels, key))
    natural_flops = _flops(natural)
    self.train_flops = natural_flops + args.attack_steps * (at_flops -
                                                            natural_flops)

    self.float_images = jax.jit(lambda x: x.astype(jnp.float32) / 255)(
        self.images)
    params = self.state.params
    pgd20 = evaluation.make_attack_fn(self.model,
                                      attack_names.parse_attack("pgd20"),
                                      eps=8 / 255,
                                      alpha=2 / 255)
    start = time.perf_counter()
    self.eval_step = pgd20.lower(params, key, self.float_images,
                                 self.labels).compile()
    self.eval_compile_s = time.perf_counter() - start
    clean = evaluation.make_attack_fn(self.model,
                                      attack_names.parse_attack("clean"),
                                      eps=8 / 255,
                                      alpha=2 / 255)
    clean_flops = _flops(
        clean.lower(params, key, self.float_images, self.labels))
    pgd_flops = _flops(pgd20.lower(params, key, self.float_images, self.labels))
    # The PGD step's program holds the loop body once plus two plain
    # forward passes (the restart's final loss and the accuracy).
    self.eval_flops = 2 * clean_flops + 20 * (pgd_flops - 2 * clean_flops)
    self.train_peak_bytes = _peak_bytes(self.train_step)
    self.eval_peak_bytes = _peak_bytes(self.eval_step)

  def run_train(self):
    self.state, metrics = self.train_step(self.state, self.images, self.labels,
                                          self.key)
    jax.block_until_ready(metrics)

  def run_eval(self):
    jax.block_until_ready(
        self.eval_step(self.state.params, self.key, self.float_images,
                       self.labels))


class TorchSide:
  """The reference's PGD-AT step and PGD-20 evaluation on timm's model."""

  def __init__(self, args):
    import timm
    import torch
    self.torch = torch
    torch.manual_seed(0)
    self.model = timm.create_model(args.model,
                                   pretrained=False,
                                   num_classes=NUM_CLASSES,
                                   img_size=32,
                                   patch_size=4)
    self.mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    self.opt = torch.optim.SGD(self.model.parameters(),
                               lr=0.1,
                               momentum=0.9,
                               weight_decay=1e-4)
    self.x = torch.rand(args.batch_size, 3, 32, 32)
    self.y = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    self.eps, self.alpha = 8 / 255, 2 / 255
    self.attack_steps = args.attack_steps

  def logits(self, x):
    return self.model((x - self.mean) / self.std)

  def _step(self, delta, grad):
    torch = self.torch
    delta = torch.clamp(delta + self.alpha * grad.sign(), -self.eps, self.eps)
    return torch.max(torch.min(delta, 1 - self.x), -self.x)

  def run_train(self):
    torch, f = self.torch, self.torch.nn.functional
    self.model.eval()
    delta = torch.empty_like(self.x).uniform_(-self.eps, self.eps)
    delta = torch.max(torch.min(delta, 1 - self.x), -self.x)
    for _ in range(self.attack_steps):
      delta.requires_grad_(True)
      loss = f.cross_entropy(self.logits(self.x + delta), self.y)
      grad, = torch.autograd.grad(loss, delta)
      delta = self._step(delta.detach(), grad)
    self.model.train()
    loss = f.cross_entropy(self.logits(torch.clamp(self.x + delta, 0, 1)),
                           self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()

  def run_eval(self):
    torch, f = self.torch, self.torch.nn.functional
    self.model.eval()
    delta = torch.empty_like(self.x).uniform_(-self.eps, self.eps)
    delta = torch.max(torch.min(delta, 1 - self.x), -self.x)
    for _ in range(20):
      delta.requires_grad_(True)
      logits = self.logits(self.x + delta)
      loss = f.cross_entropy(logits, self.y, reduction="sum")
      grad, = torch.autograd.grad(loss, delta)
      correct = (logits.argmax(1) == self.y).view(-1, 1, 1, 1)
      delta = torch.where(correct, self._step(delta.detach(), grad),
                          delta.detach())
    with torch.no_grad():
      return (self.logits(self.x + delta).argmax(1) == self.y)


def matmul_gflops(n=2048, repeats=5):
  """Best f32 n x n matmul rate of XLA (and PyTorch, if present)."""
  flops = 2 * n**3
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best = min(
      _timed(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))
  result = {"xla": flops / best / 1e9}
  try:
    import torch
    t = torch.from_numpy(np.array(a))
    torch.mm(t, t)
    result["torch"] = flops / min(
        _timed(lambda: torch.mm(t, t)) for _ in range(repeats)) / 1e9
  except ImportError:
    pass
  return result


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def pipeline_images_per_s(batch_size, num_batches=200):
  """Training-batch throughput (prefetch 2) on CIFAR-10 (digits without it)."""
  from vitat_jax import data as data_lib
  config = cifar10.get_config(f"source=folder,root={_CIFAR10_FOLDER}").data
  name = "CIFAR-10 (image folder)"
  if not os.path.isdir(_CIFAR10_FOLDER):
    config.name, config.image_size, name = "digits", 16, "digits"
  splits = data_lib.load(config)
  batches = pipeline.train_batches(splits.train, batch_size, seed=0)
  next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  batches.close()
  return name, num_batches * batch_size / seconds


def _worker(side_name, args, conn):
  """Runs one side in its own process: no thread pool spins beside the other."""
  side = {"jax": JaxSide, "torch": TorchSide}[side_name](args)
  info = {
      k: v
      for k, v in vars(side).items()
      if k.endswith(("_s", "_flops", "_bytes", "_devices"))
  }
  conn.send(info)
  while True:
    command = conn.recv()
    if command == "stop":
      info = {
          "max_rss_mib":
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
      }
      if side_name == "jax":
        info["matmul_gflops"] = matmul_gflops()
      conn.send(info)
      return
    conn.send(_timed(getattr(side, f"run_{command}")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="deit_tiny_patch16_224")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--attack_steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--ard", action="store_true")
  parser.add_argument("--prm", action="store_true")
  parser.add_argument("--compute_dtype", default="float32")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--cpu_devices",
                      type=int,
                      default=1,
                      help="CPU devices the JAX side splits the batch over "
                      "(XLA's host device count), as training does on a mesh")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--no_eval", action="store_true")
  parser.add_argument("--no_pipeline", action="store_true")
  args = parser.parse_args()

  if args.cpu_devices > 1:  # read by the spawned JAX worker's XLA
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [
            os.environ.get("XLA_FLAGS", ""),
            f"--xla_force_host_platform_device_count={args.cpu_devices}"
        ]))
  print(
      f"JAX {jax.__version__}, {args.model}, 32 px, patch 4, batch "
      f"{args.batch_size}, PGD-{args.attack_steps} AT step, compute "
      f"{args.compute_dtype}, remat {args.remat}, {args.cpu_devices} CPU "
      f"device(s); "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
      flush=True)
  names = ["jax"]
  if not args.no_torch:
    try:
      import timm  # pylint: disable=unused-import
      import torch  # pylint: disable=unused-import
      names.append("torch")
    except ImportError as e:
      print(f"PyTorch side skipped ({e}); install torch and timm to compare")
  context = multiprocessing.get_context("spawn")
  workers, infos = {}, {}
  for name in names:
    parent, child = context.Pipe()
    process = context.Process(target=_worker, args=(name, args, child))
    process.start()
    workers[name] = (process, parent)
    infos[name] = parent.recv()
  jax_info = infos["jax"]
  print(f"compile: AT step {jax_info['train_compile_s']:.1f} s, PGD-20 step "
        f"{jax_info['eval_compile_s']:.1f} s")
  print(
      f"XLA cost analysis (loops x trip count): AT step "
      f"{jax_info['train_flops'] / 1e9:.0f} GFLOP, PGD-20 step "
      f"{jax_info['eval_flops'] / 1e9:.0f} GFLOP; peak memory (XLA "
      f"estimate, per device x {jax_info['num_devices']}): AT step "
      f"{jax_info['train_peak_bytes'] / 2**20:.0f} MiB, "
      f"PGD-20 {jax_info['eval_peak_bytes'] / 2**20:.0f} MiB",
      flush=True)

  kinds = ["train"] + ([] if args.no_eval else ["eval"])

  def run(name, kind):
    workers[name][1].send(kind)
    return workers[name][1].recv()

  for kind in kinds:  # warm-up, untimed
    for name in names:
      run(name, kind)
  times = {(n, k): [] for n in names for k in kinds}
  for _ in range(args.repeats):  # alternating, so drifting load hits both
    for kind in kinds:
      for name in names:
        times[name, kind].append(run(name, kind))
  for name, (process, conn) in workers.items():
    conn.send("stop")
    infos[name].update(conn.recv())
    process.join()

  peak = infos["jax"]["matmul_gflops"]
  print(f"matmul peak (f32 2048^2): XLA {peak['xla']:.0f} GFLOP/s" +
        (f", PyTorch {peak['torch']:.0f} GFLOP/s" if "torch" in peak else ""))
  flops = {"train": jax_info["train_flops"], "eval": jax_info["eval_flops"]}
  for kind in kinds:
    label = {
        "train": f"AT step (PGD-{args.attack_steps} + SGD)",
        "eval": "PGD-20 eval step"
    }[kind]
    med = {n: statistics.median(times[n, kind]) for n in names}
    line = (f"{label}: JAX median {med['jax']:.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in times['jax', kind])}), "
            f"{flops[kind] / med['jax'] / 1e9:.0f} GFLOP/s = "
            f"{100 * flops[kind] / med['jax'] / 1e9 / peak['xla']:.0f}% of "
            "the XLA matmul peak")
    if "torch" in names:
      line += (f"; PyTorch median {med['torch']:.2f} s (runs "
               f"{', '.join(f'{t:.2f}' for t in times['torch', kind])}); "
               f"PyTorch/JAX time ratio {med['torch'] / med['jax']:.2f}")
    print(line)
  print("max RSS: " +
        ", ".join(f"{n} {infos[n]['max_rss_mib']:.0f} MiB" for n in names))

  if not args.no_pipeline:
    name, rate = pipeline_images_per_s(args.batch_size)
    consumed = args.batch_size / statistics.median(times["jax", "train"])
    print(f"input pipeline ({name}, prefetch 2): {rate:.0f} images/s; the AT "
          f"step consumes {consumed:.1f} images/s ({rate / consumed:.0f}x)")


if __name__ == "__main__":
  main()

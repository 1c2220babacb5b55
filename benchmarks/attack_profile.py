r"""Where an attack iteration's time goes: timing and an op-level profile.

Times `--iterations` PGD iterations (forward + gradient w.r.t. the input,
parameters fixed: the inner loop of the AT step) of ViT-Ti at 32 px, patch 4,
batch 32, as one jitted `lax.fori_loop`, with the batch split over
`--cpu_devices` CPU devices; with `--profile`, also traces one run with
`jax.profiler` and sums the op times by what the ops compute (read from the
compiled HLO's `op_name` metadata). The numbers of benchmarks/NOTES.md
attempts 8-10 come from:

    python -m benchmarks.attack_profile --profile
    python -m benchmarks.attack_profile --cpu_devices=2
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.attack_profile

Run from the repository root, as a module (`python -m benchmarks.attack_profile`):
the checkout's `vitat_jax`, `configs` and `benchmarks` then import without a path set up here.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu_devices", type=int, default=1)
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--profile", action="store_true")
  return parser.parse_args()


ARGS = _parse()
if ARGS.cpu_devices > 1:  # before JAX starts its CPU client
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [
          os.environ.get("XLA_FLAGS", ""),
          f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"
      ]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step
from vitat_jax import parallel
from vitat_jax import state as state_lib

# What an op computes, from its op_name; first match wins.
CATEGORIES = (
    ("dense matmuls (qkv, proj, fc1, fc2)", r"/(qkv|proj|fc1|fc2)/dot_general"),
    ("per-head attention matmuls", r"/attn/bh\w+,bh\w+->bh\w+"),
    ("softmax reductions", r"/attn/reduce_(max|sum)"),
    ("everything else (elementwise, LayerNorm, transposes)", r""),
)


def attack_loop(model, iterations):

  def one(params, x, y):

    def loss(xi):
      logits = model.apply({"params": params}, xi)
      return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10))

    return x + 0.01 * jnp.sign(jax.grad(loss)(x))

  return jax.jit(lambda params, x, y: jax.lax.fori_loop(
      0, iterations, lambda _, xi: one(params, xi, y), x))


def profile(loop, params, x, y):
  """Op time (ms) per category over one traced run of the loop."""
  hlo = loop.lower(params, x, y).compile().as_text()
  op_names = dict(re.findall(r'%([\w.\-]+) = .*?op_name="([^"]*)"', hlo))
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    jax.block_until_ready(loop(params, x, y))
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                        recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    op_name = op_names.get(event.get("name"))
    if event.get("ph") != "X" or op_name is None:
      continue
    category = next(
        c for c, pattern in CATEGORIES if re.search(pattern, op_name))
    totals[category] += event.get("dur", 0) / 1000
  return totals


def main():
  model = state_lib.build_model(
      train_step.make_config(
          argparse.Namespace(model="deit_tiny_patch16_224",
                             batch_size=32,
                             attack_steps=10,
                             ard=False,
                             prm=False,
                             compute_dtype="float32",
                             remat=False))).clone(num_classes=10,
                                                  img_size=32,
                                                  mean=train_step.CIFAR10_MEAN,
                                                  std=train_step.CIFAR10_STD)
  mesh = parallel.make_mesh()
  params = parallel.replicate(
      mesh,
      jax.jit(model.init)(jax.random.key(0), jnp.zeros(
          (1, 32, 32, 3)))["params"])
  x, y = parallel.shard_global_batch(
      mesh, (np.random.default_rng(0).uniform(size=(32, 32, 32, 3)).astype(
          np.float32), np.arange(32, dtype=np.int32) % 10))
  loop = attack_loop(model, ARGS.iterations)
  jax.block_until_ready(loop(params, x, y))
  walls, cpus = [], []
  for _ in range(ARGS.repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(loop(params, x, y))
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  print(f"{ARGS.iterations} attack iterations, {mesh.devices.size} CPU "
        f"device(s), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: wall "
        f"median {statistics.median(walls):.3f} s (runs "
        f"{', '.join(f'{w:.2f}' for w in walls)}), CPU median "
        f"{statistics.median(cpus):.3f} s")
  if ARGS.profile:
    totals = profile(loop, params, x, y)
    everything = sum(totals.values())
    print(f"op time in one traced run: {everything:.0f} ms")
    for category, _ in CATEGORIES:
      print(f"  {100 * totals[category] / everything:5.1f}%  "
            f"{totals[category]:7.0f} ms  {category}")
    # Dense matmul FLOPs per iteration: qkv (3 d^2), proj (d^2) and the MLP
    # (2 r d^2) per token and block, forward and input gradient.
    d, r = model.embed_dim, model.mlp_ratio
    tokens = 32 * ((32 // model.patch_size)**2 + 1)
    dense = 2 * 2 * tokens * model.depth * (4 + 2 * r) * d * d
    rate = ARGS.iterations * dense / (totals[CATEGORIES[0][0]] / 1000) / 1e9
    print(f"dense matmuls: {rate:.0f} GFLOP/s; compare the f32 matmul peak "
          "that benchmarks/train_step.py prints")


if __name__ == "__main__":
  main()

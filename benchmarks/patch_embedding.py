r"""The patch embedding on XLA:CPU: strided convolution against patchify + matmul.

timm's patch embedding is a convolution with stride == kernel. Its input
gradient compiles on XLA:CPU to a base-dilated convolution; written as
reshape, transpose and one matmul (`layers.PatchEmbedding`, what the models
use) it is a plain matmul both ways. This script times, in one process and
on the same params, the old formulation (a `lax.conv_general_dilated`, as
`nn.Conv` computed it, swapped in with `nn.intercept_methods`) against the
new one, for a 224-px DeiT-Ti (deit_tiny_patch16_224), float32:

  1. the patch embedding's input gradient alone (batch 2);
  2. the whole model's input gradient (batch 2);
  3. a PGD-20 evaluation batch (`--pgd_batch`, 20 forward + input-gradient
     iterations in one `lax.fori_loop`);
  4. for reference, attention through `jax.nn.dot_product_attention` (the
     models' default) against the explicit einsum path, as in 2.

Runs alternate old/new after a warm-up; medians of `--repeats` of the wall
time and of this process's CPU time. The numbers
of docs/performance.md come from:

    python benchmarks/patch_embedding.py
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitat_jax import models
from vitat_jax.models import layers


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--pgd_batch", type=int, default=8)
  parser.add_argument("--pgd_repeats", type=int, default=3)
  return parser.parse_args()


def conv_patch_embedding(module, x):
  """The formulation before: `nn.Conv`'s strided convolution, same params."""
  p = module.patch_size
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias")
  y = jax.lax.conv_general_dilated(x.astype(jnp.float32),
                                   kernel, (p, p),
                                   "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias


def _as_convolution(next_fun, args, kwargs, context):
  if (isinstance(context.module, layers.PatchEmbedding) and
      context.method_name == "__call__"):
    return conv_patch_embedding(context.module, *args)
  return next_fun(*args, **kwargs)


def _apply(model, old):
  """model.apply, with the old convolution when `old`."""

  def apply(params, images):
    if not old:
      return model.apply({"params": params}, images)
    with nn.intercept_methods(_as_convolution):
      return model.apply({"params": params}, images)

  return apply


def _input_grad(apply):

  def loss(params, x, y):
    logits = apply(params, x)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None],
                                axis=1).sum()

  return jax.jit(jax.grad(loss, argnums=1))


def _pgd(apply, steps=20, eps=8 / 255, alpha=2 / 255):
  grad = _input_grad(apply)

  def attack(params, x, y):

    def step(_, x_adv):
      x_adv = x_adv + alpha * jnp.sign(grad(params, x_adv, y))
      return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, x)

  return jax.jit(attack)


def _time(fns, args, repeats):
  """{name: (median wall s, median CPU s of this process)}, the fns taking
  turns; CPU time is the steadier on a shared machine."""
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {
      name: (statistics.median(wall[name]), statistics.median(cpu[name]))
      for name in fns
  }


def _report(title, medians, unit=1e3, suffix="ms"):
  (old, old_cpu), (new, new_cpu) = medians["old"], medians["new"]
  print(f"{title}\n  wall: old {old * unit:8.1f} {suffix}, new "
        f"{new * unit:8.1f} {suffix}, old/new {old / new:5.2f}x"
        f"   CPU: old {old_cpu * unit:8.1f} {suffix}, new "
        f"{new_cpu * unit:8.1f} {suffix}, old/new {old_cpu / new_cpu:5.2f}x")


def main():
  args = _parse()
  model = models.create("deit_tiny_patch16_224")
  key_x, key_p = jax.random.split(jax.random.key(0))
  images = jax.random.uniform(key_x, (2, 224, 224, 3))
  labels = jnp.array([1, 2])
  params = jax.jit(model.init)(key_p, images)["params"]
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; deit_tiny_patch16_224, 224 px, float32; "
        f"medians of {args.repeats} (PGD: {args.pgd_repeats})")

  embed = layers.PatchEmbedding(192, 16)
  embed_params = {"params": params["patch_embed"]}

  def embed_grad(old):
    apply = lambda x: (conv_patch_embedding(embed.bind(embed_params), x)
                       if old else embed.apply(embed_params, x))
    return jax.jit(jax.grad(lambda x: jnp.sum(apply(x)**2)))

  medians = _time({
      "old": embed_grad(True),
      "new": embed_grad(False)
  }, (images,), args.repeats)
  _report("patch embedding alone, input gradient, batch 2", medians)

  medians = _time(
      {
          "old": _input_grad(_apply(model, old=True)),
          "new": _input_grad(_apply(model, old=False))
      }, (params, images, labels), args.repeats)
  _report("DeiT-Ti input gradient, batch 2", medians)

  batch = args.pgd_batch
  pgd_images = jax.random.uniform(key_x, (batch, 224, 224, 3))
  pgd_labels = jnp.arange(batch) % 1000
  medians = _time(
      {
          "old": _pgd(_apply(model, old=True)),
          "new": _pgd(_apply(model, old=False))
      }, (params, pgd_images, pgd_labels), args.pgd_repeats)
  _report(f"PGD-20 evaluation batch, batch {batch}", medians, 1, "s")

  explicit = model.clone(fused_attention=False)
  medians = _time(
      {
          "old": _input_grad(_apply(explicit, old=False)),
          "new": _input_grad(_apply(model, old=False))
      }, (params, images, labels), args.repeats)
  _report("attention: explicit (old) vs fused (new), input grad, batch 2",
          medians)


if __name__ == "__main__":
  main()

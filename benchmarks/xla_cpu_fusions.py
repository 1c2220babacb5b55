"""Input-gradient speed of transformers under XLA:CPU's fusion options.

Times forward and forward + input-gradient passes (what every attack step
runs) of three models, compiled with XLA's defaults and with AutoAttack's
`CPU_COMPILER_OPTIONS` (YNNPACK for single dots only), side by side:

    python -m benchmarks.xla_cpu_fusions

Run from the repository root, as a module (`python -m benchmarks.xla_cpu_fusions`):
the checkout's `vitat_jax` then import without a path set up here.
"""

import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax import models  # pylint: disable=wrong-import-position

OPTIONS = importlib.import_module(
    "vitat_jax.attacks.autoattack").CPU_COMPILER_OPTIONS
MODELS = (
    ("DeiT-Ti, 32 px, patch 4", "deit_tiny_patch16_224",
     dict(num_classes=10, img_size=32, patch_size=4), 128, 3),
    ("DeiT-S, 32 px, patch 4", "deit_small_patch16_224",
     dict(num_classes=10, img_size=32, patch_size=4), 64, 3),
    ("tiny ViT (autoattack_parity.py)", "deit_tiny_patch16_224",
     dict(num_classes=10,
          img_size=8,
          patch_size=2,
          embed_dim=32,
          depth=2,
          num_heads=2), 500, 1),
)


def _ms(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def main():
  print(f"JAX {jax.__version__}, options {OPTIONS}")
  for title, name, kwargs, batch, channels in MODELS:
    model = models.create(name, **kwargs)
    size = kwargs["img_size"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, size, size, channels), np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch))
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]

    def loss(p, x, y):
      logits = model.apply({"params": p}, x)
      return jnp.sum(
          jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grad = jax.grad(loss, 1)
    fwd = lambda p, x: model.apply({"params": p}, x)
    row = []
    for options in (None, OPTIONS):
      row.append(_ms(jax.jit(fwd, compiler_options=options), params, x))
      row.append(_ms(jax.jit(grad, compiler_options=options), params, x, y))
    print(f"{title}, batch {batch}: forward {row[0]:.1f} -> {row[2]:.1f} ms, "
          f"forward + input gradient {row[1]:.1f} -> {row[3]:.1f} ms "
          f"({row[1] / row[3]:.2f}x)")


if __name__ == "__main__":
  main()

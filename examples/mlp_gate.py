"""ARD's trick moved to the MLP branch: while the training attack (PGD) is
generated, each block's MLP-branch gradient is kept with probability r.

The models take two gradient gates, `attn_keep` (ARD's) and `mlp_keep`, one
value per block (`model.num_mlp_blocks`); forward values stay unchanged.
Here r ramps from 0 to 1 (`masks.warmup_value`), masks are drawn afresh in
every attack iteration, and the parameter update sees no gate. Random
images and labels stand in for a data set.

    python examples/mlp_gate.py --tiny    # a 2-block DeiT on 8 px, seconds
    python examples/mlp_gate.py           # DeiT-Ti at CIFAR-10's 32 px
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

from vitat_jax import attacks, masks, models, objectives


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny model, 8 px")
  parser.add_argument("--steps", type=int, default=8, help="training steps")
  args = parser.parse_args()
  sizes = (dict(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2)
           if args.tiny else dict(img_size=32, patch_size=4))
  model = models.create("deit_tiny_patch16_224", num_classes=10, **sizes)
  image_key, label_key, init_key, loop_key = jax.random.split(
      jax.random.key(0), 4)
  size = model.img_size
  images = jax.random.uniform(image_key, (32, size, size, 3))
  targets = jax.nn.one_hot(jax.random.randint(label_key, (32,), 0, 10), 10)
  params = jax.jit(model.init)(init_key, images)["params"]
  optimizer = optax.sgd(0.05, momentum=0.9)
  opt_state = optimizer.init(params)

  def attack(params, key, r):
    """PGD-3 at eps 8/255; each block's MLP gradient kept w.p. r."""
    params = jax.lax.stop_gradient(params)

    def objective(x_adv, iteration_key):
      mlp_keep = jax.random.bernoulli(iteration_key, r, (model.num_mlp_blocks,))
      logits = model.apply({"params": params},
                           x_adv,
                           mlp_keep=mlp_keep.astype(jnp.float32))
      return objectives.soft_cross_entropy(logits, targets)

    return attacks.perturb(objective,
                           key,
                           images,
                           eps=8 / 255,
                           alpha=2 / 255,
                           steps=3)

  @jax.jit
  def update(params, opt_state, key, r):
    x_adv = attack(params, key, r)
    loss, grads = jax.value_and_grad(lambda p: objectives.soft_cross_entropy(
        model.apply({"params": p}, x_adv), targets))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(args.steps):
    r = masks.warmup_value((step + 1) / args.steps, warmup_epochs=1.0)
    params, opt_state, loss = update(params, opt_state,
                                     jax.random.fold_in(loop_key, step), r)
    print(f"step {step + 1}/{args.steps} r={float(r):.3f} "
          f"adversarial loss={float(loss):.4f}")


if __name__ == "__main__":
  main()

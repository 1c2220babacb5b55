"""The gradient gates of every family: `attn_keep` (ARD) and `mlp_keep`.

ARD's own tests stay in test_vit.py, test_convit.py and test_swin.py; these
show the MLP gate: forward values unchanged, the gated MLP branch's
gradient gone, and with both gates closed only the residual path left.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax import models
from vitat_jax.models import convit
from vitat_jax.models import layers
from vitat_jax.models import swin

# Tiny members of each family on 8-px images; ConViT's block 0 is GPSA and
# block 1 MHSA; Swin's two stages hold blocks 0-1 (1 shifted) and 2-3.
FAMILIES = {
    "deit":
        models.create("deit_tiny_patch16_224",
                      num_classes=10,
                      img_size=8,
                      patch_size=4,
                      embed_dim=16,
                      depth=2,
                      num_heads=2),
    "convit":
        models.create("convit_tiny",
                      num_classes=10,
                      img_size=8,
                      patch_size=4,
                      embed_dim=8,
                      depth=2,
                      num_heads=2,
                      local_up_to_layer=1),
    "swin":
        models.create("swin_tiny_patch4_window7_224",
                      num_classes=10,
                      img_size=8,
                      patch_size=2,
                      window_size=2,
                      embed_dim=8,
                      depths=(2, 2),
                      num_heads=(2, 2)),
}
IMAGES = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
LABELS = jnp.array([0, 3])


@functools.lru_cache(maxsize=None)
def _setup(family):
  model = FAMILIES[family]
  params = jax.jit(model.init)(jax.random.key(0), IMAGES)["params"]
  return model, params


def _block_paths(model):
  """Each block's module path, in the order of the keep-masks."""
  if isinstance(model, models.SwinTransformer):
    return [(f"layers_{i}", f"blocks_{j}")
            for i, depth in enumerate(model.depths)
            for j in range(depth)]
  return [(f"blocks_{i}",) for i in range(model.depth)]


def _blocks(model, tree):
  """The per-block subtrees of a params (or gradient) tree, in mask order."""
  blocks = []
  for path in _block_paths(model):
    block = tree
    for name in path:
      block = block[name]
    blocks.append(block)
  return blocks


def _loss(model, params, images, attn_keep, mlp_keep):
  logits = model.apply({"params": params},
                       images,
                       attn_keep=attn_keep,
                       mlp_keep=mlp_keep)
  return -jnp.take_along_axis(
      jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean()


@functools.lru_cache(maxsize=None)
def _jitted_grads(model):
  return jax.jit(jax.grad(functools.partial(_loss, model), argnums=(0, 1)))


def _grads(model, params, attn_keep, mlp_keep):
  """(param gradients, input gradient) of the loss: one compiled program
  per model and pattern of None masks, shared by the tests."""
  return _jitted_grads(model)(params, IMAGES, attn_keep, mlp_keep)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_mlp_keep_value_per_block(family):
  model = FAMILIES[family]
  expected = 4 if family == "swin" else 2
  assert model.num_mlp_blocks == model.num_attention_blocks == expected
  with pytest.raises(ValueError, match=r"mlp_keep must have shape \("):
    model.apply({"params": _setup(family)[1]},
                IMAGES,
                mlp_keep=jnp.ones(model.num_mlp_blocks + 1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlp_gate_leaves_forward_values_unchanged(family):
  model, params = _setup(family)
  forward = jax.jit(lambda a, m: model.apply(
      {"params": params}, IMAGES, attn_keep=a, mlp_keep=m))
  n = model.num_mlp_blocks
  ones = jnp.ones(n)
  gated = forward(ones, ones)
  for mlp_keep in (jnp.zeros(n), jnp.arange(n) % 2.0):
    for attn_keep in (ones, 1.0 - mlp_keep):
      np.testing.assert_array_equal(forward(attn_keep, mlp_keep), gated)
  # Without gates the program differs, and XLA may fuse it differently:
  # equal up to float32 rounding (ARD's gate alike).
  np.testing.assert_allclose(forward(None, None), gated, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlp_keep_zero_drops_only_that_blocks_mlp_gradient(family):
  model, params = _setup(family)
  n = model.num_mlp_blocks
  closed = n - 2  # Swin: the first block of the second stage
  ones = jnp.ones(n)
  grads, _ = _grads(model, params, ones, ones.at[closed].set(0.0))
  for i, block in enumerate(_blocks(model, grads)):
    # The MLP and its LayerNorm reach the loss only through the gated branch.
    mlp = jax.tree.leaves(block["mlp"]) + jax.tree.leaves(block["norm2"])
    if i == closed:
      assert not any(np.any(leaf) for leaf in mlp)
    else:
      assert all(np.any(leaf) for leaf in mlp), i
    assert np.any(block["attn"]["proj"]["kernel"])  # attention untouched
  # Open gates: the ungated gradient (up to float32 rounding, see above).
  kept = _grads(model, params, ones, ones)
  plain = _grads(model, params, ones, None)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), kept,
      plain)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gates_closed_leave_only_the_residual_path(family):
  model, params = _setup(family)
  n = model.num_mlp_blocks
  # The last block's attention stays open: through it the class token (that
  # ViT and ConViT classify) reads the patch tokens, so the input gradient
  # is not zero.
  attn_keep = jnp.zeros(n).at[-1].set(1.0)
  _, gated = _grads(model, params, attn_keep, jnp.zeros(n))
  _, mlp_open = _grads(model, params, attn_keep, None)
  open_attention = _block_paths(model)[-1] + ("attn",)

  def residual_path_only(images):
    # The closed branches' outputs treated as constants.
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (context.module.name in ("attn", "mlp") and
          context.module.path != open_attention):
        return jax.lax.stop_gradient(out)
      return out

    with nn.intercept_methods(intercept):
      return _loss(model, params, images, None, None)

  reference = jax.jit(jax.grad(residual_path_only))(IMAGES)
  assert np.abs(reference).max() > 1e-6
  np.testing.assert_allclose(gated, reference, rtol=1e-5, atol=1e-7)
  # The MLP branches did carry input gradient before they were closed.
  assert not np.allclose(gated, mlp_open, rtol=1e-3, atol=1e-6)


# One block of each kind and its input: tokens [batch, tokens, width] for the
# ViT and ConViT blocks (GPSA needs a square token count), a feature map
# [batch, height, width, channels] of 2x2 windows for Swin.
BLOCKS = {
    "vit": (layers.Block(2), (2, 16, 16)),
    "convit_gpsa": (convit.ConViTBlock(2, use_gpsa=True), (2, 16, 16)),
    "convit_mhsa": (convit.ConViTBlock(2, use_gpsa=False), (2, 16, 16)),
    "swin": (swin.SwinBlock(2, window_size=2), (2, 4, 4, 16)),
    "swin_shifted": (swin.SwinBlock(2, window_size=2,
                                    shift_size=1), (2, 4, 4, 16)),
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_a_closed_blocks_input_gradient_is_the_skip_paths(kind):
  block, shape = BLOCKS[kind]
  x = jax.random.normal(jax.random.key(2), shape)
  cotangent = jax.random.normal(jax.random.key(3), shape)
  variables = jax.jit(block.init)(jax.random.key(0), x)

  @jax.jit
  def input_grad(attn_keep, mlp_keep):
    out, vjp = jax.vjp(lambda v: block.apply(variables, v, attn_keep, mlp_keep),
                       x)
    return out, vjp(cotangent)[0]

  out, closed = input_grad(jnp.float32(0), jnp.float32(0))
  np.testing.assert_allclose(out, block.apply(variables, x), rtol=0, atol=1e-6)
  # y = x + gate(attn(...)) + gate(mlp(...)): closed, dy/dx is the identity.
  np.testing.assert_array_equal(closed, cotangent)
  _, mlp_open = input_grad(jnp.float32(0), jnp.float32(1))
  assert not np.allclose(mlp_open, cotangent, rtol=1e-3, atol=1e-6)


def test_remat_passes_the_mlp_gate_through():
  model, params = _setup("deit")
  keeps = jnp.ones(2), jnp.array([0.0, 1.0])
  remat = _grads(model.clone(remat=True), params, *keeps)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      remat, _grads(model, params, *keeps))
  blocks_0_mlp = jax.tree.leaves(remat[0]["blocks_0"]["mlp"])
  assert not any(np.any(leaf) for leaf in blocks_0_mlp)

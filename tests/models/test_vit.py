"""ViT / DeiT: timm-compatible sizes, the ARD gate, and one-line errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax import models
from vitat_jax.errors import UserError
from vitat_jax.models import layers


def _num_params(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, model.img_size, model.img_size, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "name, expected",
    [
        # Parameter counts of timm.create_model(name) (timm's model cards).
        ("vit_tiny_patch16_224", 5_717_416),
        ("deit_tiny_patch16_224", 5_717_416),
        ("vit_small_patch16_224", 22_050_664),
        ("vit_base_patch16_224", 86_567_656),
        ("vit_large_patch16_224", 304_326_632),
        ("deit_base_distilled_patch16_224", 87_338_192),
        ("vit_small_patch16_224_legacy", 48_754_408),
    ])
def test_sizes_match_timm(name, expected):
  assert _num_params(models.create(name)) == expected


def test_timm_keywords_override_the_variant():
  model = models.create("deit_tiny_patch16_224",
                        num_classes=10,
                        img_size=32,
                        patch_size=4,
                        embed_dim=48,
                        depth=2,
                        num_heads=3,
                        mlp_ratio=2.0)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  assert shapes["pos_embed"].shape == (1, 8 * 8 + 1, 48)
  assert shapes["patch_embed"]["kernel"].shape == (4, 4, 3, 48)
  assert shapes["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (48, 96)
  assert shapes["head"]["kernel"].shape == (48, 10)
  assert "blocks_2" not in shapes
  assert model.grid_size == 8 and model.num_attention_blocks == 2


def test_in21k_has_pre_logits_and_can_drop_it():
  model = models.create("vit_base_patch16_224_in21k", depth=1)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))["params"]
  assert shapes["pre_logits"]["kernel"].shape == (768, 768)
  assert shapes["head"]["kernel"].shape == (768, 21843)
  plain = models.create("vit_base_patch16_224_in21k",
                        depth=1,
                        representation_size=None,
                        num_classes=10)
  shapes = jax.eval_shape(plain.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))["params"]
  assert "pre_logits" not in shapes


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="vit_tiny_patch16_22"), "unknown model"),
    (dict(name="vit_tiny_patch16_224", patch_size=5,
          img_size=32), "does not divide"),
    (dict(name="vit_tiny_patch16_224", embed_dim=50), "num_heads"),
    (dict(name="vit_tiny_patch16_224", window_size=7), "unknown keyword"),
])
def test_bad_arguments_are_one_line_user_errors(kwargs, fragment):
  with pytest.raises(UserError, match=fragment) as info:
    models.create(**kwargs)
  assert "\n" not in str(info.value)


# One tiny model for the numerical tests of this module.
MODEL = models.create("deit_tiny_patch16_224",
                      num_classes=10,
                      img_size=16,
                      patch_size=4,
                      embed_dim=32,
                      depth=2,
                      num_heads=2)
IMAGES = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
LABELS = jnp.array([0, 3, 5, 9])
PARAMS = MODEL.init(jax.random.key(0), IMAGES)["params"]


def _loss(params, images, keep):
  logits = MODEL.apply({"params": params}, images, attn_keep=keep)
  return -jnp.take_along_axis(
      jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean()


_grads = jax.jit(jax.grad(_loss, argnums=(0, 1)))
_forward = jax.jit(
    lambda p, x, keep: MODEL.apply({"params": p}, x, attn_keep=keep))


def test_input_is_normalised_inside_the_model():
  model = models.create("deit_tiny_patch16_224",
                        num_classes=10,
                        img_size=16,
                        patch_size=4,
                        embed_dim=32,
                        depth=2,
                        num_heads=2,
                        mean=(0.2, 0.3, 0.4),
                        std=(0.5, 0.5, 0.5))
  shifted = models.create("deit_tiny_patch16_224",
                          num_classes=10,
                          img_size=16,
                          patch_size=4,
                          embed_dim=32,
                          depth=2,
                          num_heads=2,
                          mean=(0.0, 0.0, 0.0),
                          std=(0.5, 0.5, 0.5))
  a = model.apply({"params": PARAMS}, IMAGES)
  b = shifted.apply({"params": PARAMS}, IMAGES - jnp.array([0.2, 0.3, 0.4]))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_ard_gate_leaves_forward_values_unchanged():
  plain = _forward(PARAMS, IMAGES, None)
  for keep in ([0.0, 0.0], [1.0, 0.0], [1.0, 1.0]):
    np.testing.assert_array_equal(_forward(PARAMS, IMAGES, jnp.array(keep)),
                                  plain)


def test_ard_keep_one_equals_the_plain_gradient():
  plain = _grads(PARAMS, IMAGES, None)
  kept = _grads(PARAMS, IMAGES, jnp.ones(2))
  # Equal up to float reassociation: XLA may fuse the gate's multiply by 1
  # into a different summation order (at most 1.9e-9 apart here, with the
  # last block computing its class token alone).
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), kept,
      plain)


def test_ard_keep_zero_drops_only_the_attention_branch_gradient():
  param_grads, input_grads = _grads(PARAMS, IMAGES, jnp.array([0.0, 1.0]))
  # Block 0's attention parameters reach the loss only through the gated
  # branch, so their gradient vanishes; its MLP and block 1 are untouched.
  for leaf in jax.tree.leaves(param_grads["blocks_0"]["attn"]):
    assert not np.any(leaf)
  for leaf in jax.tree.leaves(param_grads["blocks_0"]["norm1"]):
    assert not np.any(leaf)
  assert np.any(param_grads["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert np.any(param_grads["blocks_1"]["attn"]["qkv"]["kernel"])
  # The input gradient still flows through the skip and MLP paths, and
  # differs from the ungated one.
  plain_input = _grads(PARAMS, IMAGES, None)[1]
  assert np.any(input_grads)
  assert not np.allclose(input_grads, plain_input)


def test_all_dropped_equals_a_model_whose_attention_is_a_constant():
  # With every keep at 0 the input gradient equals that of the same network
  # in which each attention output is treated as a constant.
  gated = jax.grad(lambda x: _loss(PARAMS, x, jnp.zeros(2)))(IMAGES)

  def stopped_loss(images):
    # Re-implement the gate as stop_gradient on every attention output.
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == "attn":
        return jax.lax.stop_gradient(out)
      return out

    with nn.intercept_methods(intercept):
      logits = MODEL.apply({"params": PARAMS}, images)
    return -jnp.take_along_axis(
        jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean()

  stopped = jax.grad(stopped_loss)(IMAGES)
  np.testing.assert_allclose(gated, stopped, rtol=1e-5, atol=1e-7)


def test_wrong_image_size_and_mask_shape_are_clear_errors():
  with pytest.raises(ValueError, match="img_size=32"):
    MODEL.apply({"params": PARAMS}, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="attn_keep"):
    MODEL.apply({"params": PARAMS}, IMAGES, attn_keep=jnp.ones(3))


def test_registry_lists_timm_names():
  names = models.list_models()
  for name in ("vit_base_patch16_224", "deit_tiny_patch16_224",
               "deit_small_patch16_224", "vit_base_patch16_224_in21k"):
    assert name in names


def test_patch_embedding_is_timms_strided_convolution():
  # The patchify + matmul against the convolution it replaces, same kernel.
  kernel, bias = PARAMS["patch_embed"]["kernel"], PARAMS["patch_embed"]["bias"]
  x = IMAGES - 0.5
  conv = jax.lax.conv_general_dilated(
      x,
      kernel, (4, 4),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest") + bias
  ours = layers.PatchEmbedding(32, 4).apply(
      {"params": {
          "kernel": kernel,
          "bias": bias
      }}, x)
  np.testing.assert_allclose(ours, conv, rtol=1e-6, atol=1e-6)


def _output_and_input_grad(model, params, keep=None, train=False, rng=None):

  def loss(images):
    logits = model.apply({"params": params},
                         images,
                         attn_keep=keep,
                         train=train,
                         rngs=None if rng is None else {"dropout": rng})
    return -jnp.take_along_axis(
        jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean(), logits

  (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(IMAGES)
  return logits, grad


def test_fused_attention_equals_the_explicit_path_in_float32():
  assert MODEL.fused_attention is None  # the default: fused off the CPU
  assert layers.use_fused_attention(None) == (jax.default_backend() != "cpu")
  assert layers.attention_implementation(jnp.float32) == "xla"
  fused = MODEL.clone(fused_attention=True)
  explicit = MODEL.clone(fused_attention=False)
  keep = jnp.array([0.0, 1.0])  # the ARD gate composes with either path
  for a, b in zip(_output_and_input_grad(fused, PARAMS, keep),
                  _output_and_input_grad(explicit, PARAMS, keep)):
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_attention_dropout_in_training_takes_the_explicit_path():
  dropped = MODEL.clone(attn_drop_rate=0.5, fused_attention=True)
  rng = jax.random.key(3)
  fused = _output_and_input_grad(dropped, PARAMS, train=True, rng=rng)
  explicit = _output_and_input_grad(dropped.clone(fused_attention=False),
                                    PARAMS,
                                    train=True,
                                    rng=rng)
  jax.tree.map(np.testing.assert_array_equal, fused, explicit)


@pytest.mark.parametrize("fused", [False, True])
def test_a_last_block_computing_the_prefix_alone_equals_the_full_block(fused):
  """The last block before the head returns its class (and distillation)
  tokens only: the same values and input gradient as the whole block's
  first tokens, without the other tokens' attention rows, projection and
  MLP."""
  x = jax.random.normal(jax.random.key(0), (3, 17, 16))
  full = layers.Block(2, fused_attention=fused)
  params = full.init(jax.random.key(1), x)

  @jax.jit
  def both(v):  # (prefix blocks' values and input gradients, the full one's)
    out = []
    for outputs in (1, 2):
      prefix = layers.Block(2, fused_attention=fused, outputs=outputs)
      for f in (lambda u, m=prefix: m.apply(params, u),
                lambda u, n=outputs: full.apply(params, u)[:, :n]):
        out.append((f(v), jax.grad(lambda u, f=f: jnp.sum(jnp.sin(f(u))))(v)))
    return out

  results = both(x)
  for (got, grad_got), (want, grad_want) in zip(results[::2], results[1::2]):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_got, grad_want, rtol=1e-5, atol=1e-6)

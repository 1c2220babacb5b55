"""ConViT: timm sizes, locality init, class token placement, the ARD gate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax import models
from vitat_jax.errors import UserError
from vitat_jax.models import convit


@pytest.mark.parametrize(
    "name, expected",
    [
        # sum(p.numel() for p in timm.create_model(name).parameters()), timm 1.0.
        ("convit_tiny", 5_710_512),
        ("convit_small", 27_777_322),
        ("convit_base", 86_540_040),
    ])
def test_sizes_match_timm(name, expected):
  model = models.create(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == expected


MODEL = models.create("convit_tiny",
                      num_classes=10,
                      img_size=16,
                      patch_size=4,
                      embed_dim=8,
                      depth=4,
                      num_heads=4,
                      local_up_to_layer=2)
IMAGES = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
LABELS = jnp.array([0, 3])
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), IMAGES)["params"]


def test_timm_keywords_and_layout():
  # timm's embed_dim is the width per head.
  assert MODEL.width == 32 and MODEL.grid_size == 4
  assert MODEL.num_attention_blocks == 4
  # No class-token slot in the position embedding: the token joins later.
  assert PARAMS["pos_embed"].shape == (1, 16, 32)
  assert set(PARAMS["blocks_0"]["attn"]) == {
      "qk", "v", "proj", "pos_proj", "gating_param"
  }
  assert set(PARAMS["blocks_3"]["attn"]) == {"qkv", "proj"}
  assert "bias" not in PARAMS["blocks_0"]["attn"]["qk"]  # qkv_bias=False


def test_locality_initialisation():
  attn = PARAMS["blocks_1"]["attn"]
  np.testing.assert_array_equal(attn["v"]["kernel"], np.eye(32))
  np.testing.assert_array_equal(attn["gating_param"], np.ones(4))
  # 4 heads on a 2x2 lattice of offsets (+-1, +-1), weight -1 on distance.
  kernel = np.asarray(attn["pos_proj"]["kernel"])
  np.testing.assert_array_equal(kernel[2], -np.ones(4))
  np.testing.assert_array_equal(kernel[0], [-1, -1, 1, 1])
  np.testing.assert_array_equal(kernel[1], [-1, 1, -1, 1])
  # The positional attention of head 0 then peaks at offset (-1, -1).
  scores = convit.relative_indices(4) @ kernel[:, 0]
  assert tuple(convit.relative_indices(4)[5,
                                          np.argmax(scores[5]), :2]) == (-1, -1)


def test_relative_indices_are_row_major_offsets():
  rel = convit.relative_indices(3)
  # token 1 is (row 0, col 1); token 5 is (row 1, col 2)
  np.testing.assert_array_equal(rel[1, 5], [1, 1, 2])
  np.testing.assert_array_equal(rel[5, 1], [-1, -1, 2])


def _loss(params, images, keep):
  logits = MODEL.apply({"params": params}, images, attn_keep=keep)
  loss = -jnp.take_along_axis(
      jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean()
  return loss, logits


_grads = jax.jit(jax.grad(_loss, has_aux=True))


@pytest.mark.parametrize("block", [0, 2])  # a GPSA block and an MHSA block
def test_ard_gate_drops_only_that_blocks_attention_gradient(block):
  _, plain = _grads(PARAMS, IMAGES, jnp.ones(4))
  assert plain.dtype == jnp.float32 and plain.shape == (2, 10)
  keep = jnp.ones(4).at[block].set(0.0)
  grads, logits = _grads(PARAMS, IMAGES, keep)
  np.testing.assert_array_equal(logits, plain)
  for leaf in jax.tree.leaves(grads[f"blocks_{block}"]["attn"]):
    assert not np.any(leaf)
  assert np.any(grads[f"blocks_{block}"]["mlp"]["fc1"]["kernel"])
  assert np.any(grads[f"blocks_{block + 1}"]["attn"]["proj"]["kernel"])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="convit_tiny", img_size=30), "does not divide"),
    (dict(name="convit_tiny", local_up_to_layer=13), "local_up_to_layer"),
    (dict(name="convit_tiny", window_size=7), "unknown keyword"),
])
def test_bad_arguments_are_one_line_user_errors(kwargs, fragment):
  with pytest.raises(UserError, match=fragment) as info:
    models.create(**kwargs)
  assert "\n" not in str(info.value)


def _output_and_input_grad(model):

  def loss(images):
    logits = model.apply({"params": PARAMS}, images)
    return -jnp.take_along_axis(
        jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean(), logits

  (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(IMAGES)
  return logits, grad


def test_fused_mhsa_equals_the_explicit_path_in_float32():
  # Blocks 2-3 are MHSA (fused by default); GPSA blocks 0-1 stay explicit.
  fused = _output_and_input_grad(MODEL.clone(fused_attention=True))
  explicit = _output_and_input_grad(MODEL.clone(fused_attention=False))
  for a, b in zip(fused, explicit):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

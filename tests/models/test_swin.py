"""Swin: timm sizes, windows on small images, the ARD gate, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitat_jax import models
from vitat_jax.errors import UserError
from vitat_jax.models import swin


def _num_params(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, model.img_size, model.img_size, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "name, expected",
    [
        # sum(p.numel() for p in timm.create_model(name).parameters()), timm 1.0.
        ("swin_tiny_patch4_window7_224", 28_288_354),
        ("swin_small_patch4_window7_224", 49_606_258),
        ("swin_base_patch4_window7_224", 87_768_224),
        ("swin_base_patch4_window12_384", 87_903_584),
        ("swin_large_patch4_window7_224", 196_532_476),
        ("swin_large_patch4_window12_384", 196_735_516),
        ("swin_base_patch4_window7_224_in22k", 109_130_249),
        ("swin_base_patch4_window12_384_in22k", 109_265_609),
    ])
def test_sizes_match_timm(name, expected):
  assert _num_params(models.create(name)) == expected


def test_cifar_configuration_clips_the_last_windows():
  model = models.create("swin_tiny_patch4_window7_224",
                        num_classes=10,
                        img_size=32,
                        patch_size=2,
                        window_size=4,
                        embed_dim=16,
                        depths=[1, 2, 1, 1],
                        num_heads=[1, 2, 2, 4])
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  assert model.grid_size == 16 and model.patch_size == 2
  assert model.num_attention_blocks == 5
  assert model.stage_resolutions() == (16, 8, 4, 2)
  # Stage 3 sees a 2x2 map: its window shrinks to 2, so a 3x3 bias table.
  table = "relative_position_bias_table"
  assert shapes["layers_0"]["blocks_0"]["attn"][table].shape == (49, 1)
  assert shapes["layers_3"]["blocks_0"]["attn"][table].shape == (9, 4)
  assert shapes["layers_1"]["downsample"]["reduction"]["kernel"].shape == (64,
                                                                           32)
  assert "downsample" not in shapes["layers_0"]
  assert shapes["head"]["kernel"].shape == (128, 10)
  assert swin.stage_windows(4, 4) == (4, 0)
  assert swin.stage_windows(8, 4) == (4, 2)


def test_shifted_window_mask_separates_the_wrapped_regions():
  mask = swin.shifted_window_mask(8, 4, 2)
  assert mask.shape == (4, 16, 16)
  # The top-left window holds one region only; the bottom-right one holds
  # four, and tokens of different regions never attend to each other.
  assert not mask[0].any()
  assert set(np.unique(mask[3])) == {0.0, -100.0}
  np.testing.assert_array_equal(mask[3], mask[3].T)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="swin_tiny_patch4_window7_22"), "unknown model"),
    (dict(name="swin_tiny_patch4_window7_224",
          img_size=32,
          patch_size=2,
          window_size=3), "window_size=3 does not divide"),
    (dict(name="swin_tiny_patch4_window7_224", img_size=30,
          patch_size=4), "does not divide"),
    (dict(name="swin_tiny_patch4_window7_224",
          img_size=40,
          patch_size=4,
          window_size=5), "cannot be halved"),
    (dict(name="swin_tiny_patch4_window7_224", depths=(2, 2)), "one entry"),
    (dict(name="swin_tiny_patch4_window7_224", embed_dim=50), "num_heads"),
])
def test_bad_arguments_are_one_line_user_errors(kwargs, fragment):
  with pytest.raises(UserError, match=fragment) as info:
    models.create(**kwargs)
  assert "\n" not in str(info.value)


def test_unknown_name_lists_valid_names():
  with pytest.raises(UserError, match="valid names: .*swin_tiny") as info:
    models.create("no_such_model")
  assert "\n" not in str(info.value)


MODEL = models.create("swin_tiny_patch4_window7_224",
                      num_classes=10,
                      img_size=16,
                      patch_size=2,
                      window_size=4,
                      embed_dim=16,
                      depths=(2, 2),
                      num_heads=(2, 2))
IMAGES = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
LABELS = jnp.array([0, 3])
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), IMAGES)["params"]


def _loss(params, images, keep):
  logits = MODEL.apply({"params": params}, images, attn_keep=keep)
  loss = -jnp.take_along_axis(
      jax.nn.log_softmax(logits), LABELS[:, None], axis=1).mean()
  return loss, logits


# One compiled program serves every keep-mask below.
_grads = jax.jit(jax.grad(_loss, has_aux=True))


def test_ard_gate_keeps_forward_values_and_drops_attention_gradients():
  kept, plain = _grads(PARAMS, IMAGES, jnp.ones(4))
  assert plain.dtype == jnp.float32 and plain.shape == (2, 10)
  keep = jnp.array([1.0, 0.0, 1.0, 1.0])  # the shifted block of stage 0
  grads, logits = _grads(PARAMS, IMAGES, keep)
  np.testing.assert_array_equal(logits, plain)
  for leaf in jax.tree.leaves(grads["layers_0"]["blocks_1"]["attn"]):
    assert not np.any(leaf)
  for leaf in jax.tree.leaves(grads["layers_0"]["blocks_1"]["norm1"]):
    assert not np.any(leaf)
  assert np.any(kept["layers_0"]["blocks_1"]["attn"]["qkv"]["kernel"])
  assert np.any(grads["layers_0"]["blocks_1"]["mlp"]["fc1"]["kernel"])
  assert np.any(grads["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"])
  assert np.any(grads["layers_1"]["blocks_1"]["attn"]["qkv"]["kernel"])


def test_drop_path_is_on_the_attention_branch_only():
  # Rates grow linearly from 0 to ~1, so in training the last block's
  # attention branch is dropped and its MLP branch kept: the output equals
  # the eval output with that attention branch zeroed.
  model = models.create("swin_tiny_patch4_window7_224",
                        num_classes=10,
                        img_size=16,
                        patch_size=2,
                        window_size=4,
                        embed_dim=16,
                        depths=(2,),
                        num_heads=(2,),
                        drop_path_rate=1.0 - 1e-7)
  params = model.init(jax.random.key(0), IMAGES)["params"]
  apply = model.apply
  out = apply({"params": params},
              IMAGES,
              train=True,
              rngs={"dropout": jax.random.key(3)})
  proj = params["layers_0"]["blocks_1"]["attn"]["proj"]
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["layers_0"]["blocks_1"]["attn"]["proj"] = jax.tree.map(
      jnp.zeros_like, proj)
  np.testing.assert_allclose(out, apply({"params": zeroed}, IMAGES), atol=1e-5)


def test_remat_keeps_parameters_values_and_gradients():
  # Recomputing each block in the backward pass (issue 24: Swin had no
  # remat) changes neither the parameter tree nor a number.
  remat = MODEL.clone(remat=True)
  images = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3))
  assert jax.tree.structure(remat.init(jax.random.key(0), images)["params"]) \
      == jax.tree.structure(PARAMS)

  def value_and_input_grad(model):
    return jax.jit(
        jax.value_and_grad(
            lambda x: model.apply({
                "params": PARAMS
            },
                                  x,
                                  train=True,
                                  rngs={
                                      "dropout": jax.random.key(1)
                                  }).sum()))(images)

  for a, b in zip(value_and_input_grad(remat), value_and_input_grad(MODEL)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

"""Matmul precision: the patch embedding at HIGHEST, the model's elsewhere.

Read off the lowered StableHLO (tracing and lowering only, nothing is
compiled): every dot carries the precision XLA will be asked for.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from vitat_jax import models
from vitat_jax.errors import UserError
from vitat_jax.models import precision as precision_lib

_DOT = re.compile(r"stablehlo\.dot_general (.*)")


def _lowered(model, batch=2):
  images = jax.ShapeDtypeStruct((batch, model.img_size, model.img_size, 3),
                                jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.jit(model.apply).lower(params, images).as_text()


def _dots(text):
  """(operand types, is HIGHEST) of every dot_general."""
  return [(line.split(" : ")[-1], "precision = [HIGHEST, HIGHEST]" in line)
          for line in _DOT.findall(text)]


# ViT-B/16 at 224 px, one block: the widths and the patch of the real model.
VIT_B = models.create("vit_base_patch16_224", depth=1)
# The patch embedding's dot: [2, 14, 14, 16*16*3] x [16*16*3, 768].
_PATCH_DOT = "tensor<2x14x14x768xf32>, tensor<768x768xf32>"


def test_vit_b_patch_embedding_is_a_highest_dot_and_the_rest_default():
  dots = _dots(_lowered(VIT_B))
  assert "stablehlo.convolution" not in _lowered(VIT_B)
  assert [highest for types, highest in dots if _PATCH_DOT in types] == [True]
  # qkv, 2 attention einsums, proj, fc1, fc2, head: the backend's default.
  others = [highest for types, highest in dots if _PATCH_DOT not in types]
  assert len(others) >= 7 and not any(others)


@pytest.mark.parametrize("fused", [True, False])
def test_float32_evaluation_policy_puts_every_dot_of_vit_b_at_highest(fused):
  chosen = precision_lib.matmul_precision_for("auto",
                                              "float32",
                                              evaluation=True)
  assert chosen == "highest"
  dots = _dots(_lowered(VIT_B.clone(precision=chosen, fused_attention=fused)))
  assert len(dots) >= 8 and all(highest for _, highest in dots)


@pytest.mark.parametrize("name, sizes", [
    ("convit_tiny", dict(patch_size=4, depth=2, local_up_to_layer=1)),
    ("swin_tiny_patch4_window7_224",
     dict(patch_size=2, window_size=4, depths=(1, 1, 1, 1))),
])
def test_every_family_embeds_patches_with_a_highest_dot(name, sizes):
  model = models.create(name, img_size=32, num_classes=10, **sizes)
  text = _lowered(model)
  assert "stablehlo.convolution" not in text
  dots = _dots(text)
  assert sum(highest for _, highest in dots) == 1
  assert all(
      highest
      for _, highest in _dots(_lowered(model.clone(precision="highest"))))


@pytest.mark.parametrize(
    "setting, dtype, evaluation, platform, expected",
    [
        ("auto", "float32", False, "cpu", None),
        ("auto", "float32", False, "gpu", None),  # TF32, as the reference
        ("auto", "float32", False, "tpu", "high"),
        ("auto", "float32", True, "gpu", "highest"),
        ("auto", "float32", True, "tpu", "highest"),
        ("auto", "bfloat16", False, "tpu", None),
        ("auto", "bfloat16", True, "gpu", None),
        ("default", "float32", True, "cpu", None),
        ("high", "float32", False, "gpu", "high"),
        ("highest", "float32", False, "tpu", "highest"),
        ("highest", "bfloat16", False, "tpu", None),
    ])
def test_auto_precision_per_backend(setting, dtype, evaluation, platform,
                                    expected):
  assert precision_lib.matmul_precision_for(setting,
                                            dtype,
                                            evaluation=evaluation,
                                            platform=platform) == expected


def test_a_bad_model_precision_is_a_one_line_user_error():
  with pytest.raises(UserError, match="precision='fp32'") as info:
    models.create("deit_tiny_patch16_224", precision="fp32")
  assert "\n" not in str(info.value)

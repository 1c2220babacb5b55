"""`pretrained.native`: the network a checkpoint holds, from shapes alone."""

import numpy as np
import pytest

from vitat_jax.errors import UserError
from vitat_jax.pretrained import io
from vitat_jax.pretrained import native


@pytest.mark.parametrize(
    "name, shapes, expected",
    [
        # DeiT distilled at 384 px: two prefix tokens, a 24 x 24 grid.
        ("deit_base_distilled_patch16_384", {
            "head.weight": (7, 768),
            "patch_embed.proj.weight": (768, 3, 16, 16),
            "pos_embed": (1, 2 + 24 * 24, 768),
            "dist_token": (1, 1, 768)
        }, dict(num_classes=7, patch_size=16, img_size=384)),
        # ConViT: no class token in the position embedding.
        ("convit_tiny", {
            "head.weight": (10, 192),
            "patch_embed.proj.weight": (192, 3, 4, 4),
            "pos_embed": (1, 8 * 8, 192)
        }, dict(num_classes=10, patch_size=4, img_size=32)),
        # Swin: the window from a (2w - 1)^2-row table, no image size.
        ("swin_tiny_patch4_window7_224", {
            "head.fc.weight": (10, 768),
            "patch_embed.proj.weight": (96, 3, 4, 4),
            "layers.0.blocks.0.attn.relative_position_bias_table": (81, 3)
        }, dict(num_classes=10, patch_size=4, window_size=5)),
    ])
def test_sizes_come_from_the_shapes(name, shapes, expected):
  assert native.sizes_from_shapes(shapes, name, "x.safetensors") == expected


def test_a_safetensors_file_is_sized_from_its_header_alone(tmp_path):
  path = str(tmp_path / "w.safetensors")
  io.write_safetensors(
      {
          "head.weight": np.zeros((10, 192), np.float32),
          "patch_embed.proj.weight": np.zeros((192, 3, 16, 16), np.float32),
          "pos_embed": np.zeros((1, 197, 192), np.float32),
      }, path)
  data = open(path, "rb").read()
  with open(path, "wb") as f:  # the tensors cut off: the header is enough
    f.write(data[:len(data) // 4])
  spec = native.native_model(path, "deit_tiny_patch16_224")
  assert (spec.image_size, spec.num_classes) == (224, 10)
  assert spec.mean == (0.485, 0.456, 0.406)  # timm's for DeiT
  assert spec.preprocessing.crop_pct == 0.9
  with pytest.raises(UserError, match="truncated"):
    io.read(path)


def test_a_google_npz_is_sized_under_timm_names(tmp_path):
  path = str(tmp_path / "vit.npz")
  np.savez(
      path, **{
          "embedding/kernel":
              np.zeros((32, 32, 3, 192), np.float32),
          "embedding/bias":
              np.zeros((192,), np.float32),
          "cls":
              np.zeros((1, 1, 192), np.float32),
          "Transformer/posembed_input/pos_embedding":
              np.zeros((1, 1 + 7 * 7, 192), np.float32),
          "Transformer/encoder_norm/scale":
              np.zeros((192,), np.float32),
          "Transformer/encoder_norm/bias":
              np.zeros((192,), np.float32),
          "head/kernel":
              np.zeros((192, 5), np.float32),
          "head/bias":
              np.zeros((5,), np.float32),
      })
  spec = native.native_model(path, "vit_tiny_patch16_224")
  assert spec.kwargs["patch_size"] == 32 and spec.image_size == 224
  assert spec.num_classes == 5 and spec.mean == (0.5, 0.5, 0.5)


def test_no_name_and_no_card_is_one_line(tmp_path):
  path = str(tmp_path / "w.safetensors")
  io.write_safetensors({"head.weight": np.zeros((2, 2), np.float32)}, path)
  with pytest.raises(UserError, match="pass --config.model.name"):
    native.native_model(path, None, name_flag="--config.model.name")

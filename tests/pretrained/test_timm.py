"""Against timm itself: logits parity, resampling, export round trip, formats.

timm models are created with pretrained=False and random weights; their
state dicts go through the same files a user would download.
"""

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from vitat_jax import pretrained  # pylint: disable=g-import-not-at-top
from vitat_jax import models
from vitat_jax.pretrained import resample
from vitat_jax.errors import UserError

torch.set_num_threads(1)
TOL = 1e-4


def _timm(name, **kw):
  torch.manual_seed(0)
  return timm.create_model(name, pretrained=False, **kw).eval()


def _save(module, path):
  state = {k: v.contiguous() for k, v in module.state_dict().items()}
  safetensors_torch.save_file(state, str(path))
  return str(path)


def _images(model, n=2):
  return np.random.RandomState(0).rand(n, model.img_size, model.img_size,
                                       3).astype(np.float32)


def _timm_logits(module, model, images):
  x = (images - np.asarray(model.mean, np.float32)) / np.asarray(
      model.std, np.float32)
  with torch.no_grad():
    return module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _random_params(model, seed):
  """Random params of the model's shapes, drawn on the host (no compile)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, model.img_size, model.img_size, 3)))
  rng = np.random.RandomState(seed)

  def draw(path, spec):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return (base + 0.05 * rng.randn(*spec.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


_FORWARDS = {}


def _logits(model, params, images):
  key = repr(model)  # equal configurations share one compiled forward
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return np.asarray(_FORWARDS[key](params, jnp.asarray(images)))


# (name, keywords): the real widths of two sizes per family at their native
# resolution (fewer blocks to stay fast), and CIFAR-style 32x32 models.
PARITY_CASES = [
    ("deit_tiny_patch16_224", dict(depth=1)),
    ("vit_small_patch16_224", dict(depth=1)),
    ("convit_tiny", dict(depth=2, local_up_to_layer=1)),
    ("convit_small", dict(depth=2, local_up_to_layer=1)),
    ("swin_tiny_patch4_window7_224", dict(depths=(2, 1, 1, 1))),
    ("swin_base_patch4_window7_224", dict(depths=(2, 1, 1, 1))),
    # 32x32: ViT/DeiT with patch 4, Swin with patch 2 and window 4.
    ("deit_tiny_distilled_patch16_224",
     dict(img_size=32, patch_size=4, depth=2, num_classes=10)),
    ("vit_small_patch16_224",
     dict(img_size=32, patch_size=4, depth=1, num_classes=10)),
    ("convit_tiny",
     dict(img_size=32,
          patch_size=4,
          depth=2,
          local_up_to_layer=1,
          num_classes=10)),
    ("swin_tiny_patch4_window7_224",
     dict(img_size=32,
          patch_size=2,
          window_size=4,
          depths=(2, 2, 1, 1),
          num_classes=10)),
    ("swin_small_patch4_window7_224",
     dict(img_size=32,
          patch_size=2,
          window_size=4,
          embed_dim=48,
          depths=(2, 2, 2, 2),
          num_heads=(2, 4, 4, 8),
          num_classes=10)),
]


@pytest.mark.parametrize("name, kw", PARITY_CASES)
def test_logits_match_timm(name, kw, tmp_path):
  module = _timm(name, **kw)
  model = models.create(name, **kw)
  params = pretrained.load(_save(module, tmp_path / "m.safetensors"), model)
  images = _images(model)
  diff = np.abs(
      _logits(model, params, images) -
      _timm_logits(module, model, images)).max()
  assert diff <= TOL, diff


@pytest.mark.parametrize(
    "name", (models.list_models("swin") + models.list_models("convit")))
def test_parameter_counts_equal_timm(name):
  model = models.create(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, model.img_size, model.img_size, 3)))
  with torch.device("meta"):
    module = timm.create_model(name, pretrained=False)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == sum(
      p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, kw", [
    ("deit_tiny_distilled_patch16_224",
     dict(img_size=32, patch_size=4, depth=2, num_classes=10)),
    ("convit_tiny",
     dict(img_size=32,
          patch_size=4,
          depth=2,
          local_up_to_layer=1,
          num_classes=10)),
    ("swin_tiny_patch4_window7_224",
     dict(img_size=32,
          patch_size=2,
          window_size=4,
          depths=(2, 2, 1, 1),
          num_classes=10)),
])
def test_export_round_trip_through_timm(name, kw, tmp_path):
  model = models.create(name, **kw)
  images = _images(model)
  # Random values everywhere (zero biases and unit norms would hide swaps).
  params = _random_params(model, 7)
  path = str(tmp_path / "robust.safetensors")
  pretrained.export_timm(params, model, path)
  module = _timm(name, **kw)
  module.load_state_dict(safetensors_torch.load_file(path), strict=True)
  diff = np.abs(
      _logits(model, params, images) -
      _timm_logits(module, model, images)).max()
  assert diff <= TOL, diff
  # ... and back: loading the export gives the same params.
  again = pretrained.load(path, model)
  jax.tree.map(np.testing.assert_array_equal, again, params)


# --- resampling: 224px/patch-16 checkpoint -> 32px/patch-4 model ------------


def _reference_bilinear(grid, new):
  """torch F.interpolate(bilinear, align_corners=False), one output at a time."""
  old = grid.shape[0]
  out = np.zeros((new, new, grid.shape[2]), np.float64)
  scale = old / new
  for i in range(new):
    for j in range(new):
      y = max((i + 0.5) * scale - 0.5, 0.0)
      x = max((j + 0.5) * scale - 0.5, 0.0)
      y0, x0 = int(y), int(x)
      y1, x1 = min(y0 + 1, old - 1), min(x0 + 1, old - 1)
      dy, dx = y - y0, x - x0
      out[i, j] = ((1 - dy) * (1 - dx) * grid[y0, x0] +
                   (1 - dy) * dx * grid[y0, x1] + dy * (1 - dx) * grid[y1, x0] +
                   dy * dx * grid[y1, x1])
  return out


def _reference_sum_pool(kernel, patch):
  """The reference's reshape(O, I, p, K/p, p, K/p).sum(dim=[3, 5])."""
  o, i, k, _ = kernel.shape
  step = k // patch
  out = np.zeros((o, i, patch, patch), np.float64)
  for a in range(patch):
    for b in range(patch):
      out[:, :, a, b] = kernel[:, :, a * step:(a + 1) * step,
                               b * step:(b + 1) * step].sum(axis=(2, 3))
  return out


def test_cifar_adaptation_matches_the_reference_resampling(tmp_path, caplog):
  module = _timm("deit_tiny_patch16_224", depth=1)
  state = {k: v.numpy() for k, v in module.state_dict().items()}
  model = models.create("deit_tiny_patch16_224",
                        depth=1,
                        img_size=32,
                        patch_size=4,
                        num_classes=10)
  init = _random_params(model, 3)
  with caplog.at_level(logging.INFO):
    params = pretrained.load(_save(module, tmp_path / "d.safetensors"),
                             model,
                             init_params=init)
  pos = state["pos_embed"]
  expected = np.concatenate([
      pos[0, :1],
      _reference_bilinear(pos[0, 1:].reshape(14, 14, -1), 8).reshape(64, -1)
  ])
  np.testing.assert_allclose(params["pos_embed"][0], expected, atol=1e-6)
  np.testing.assert_array_equal(params["pos_embed"][0, 0], pos[0, 0])
  kernel = _reference_sum_pool(state["patch_embed.proj.weight"], 4)
  np.testing.assert_allclose(params["patch_embed"]["kernel"],
                             kernel.transpose(2, 3, 1, 0),
                             atol=1e-5)
  np.testing.assert_array_equal(params["head"]["kernel"],
                                init["head"]["kernel"])
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"],
                                state["blocks.0.attn.qkv.weight"].T)
  text = caplog.text
  assert "resampled pos_embed" in text and "sum-pooled" in text
  assert "re-initialised head/kernel" in text


def test_resampling_agrees_with_torch_interpolate():
  functional = torch.nn.functional
  rng = np.random.RandomState(1)
  for old, new in ((14, 8), (14, 2), (7, 12), (24, 8)):
    grid = rng.randn(old, old, 5).astype(np.float32)
    theirs = functional.interpolate(torch.from_numpy(grid.transpose(2, 0,
                                                                    1))[None],
                                    size=(new, new),
                                    mode="bilinear")[0].numpy().transpose(
                                        1, 2, 0)
    np.testing.assert_allclose(resample.bilinear_resize(grid, (new, new)),
                               theirs,
                               atol=1e-5)
  kernel = rng.randn(6, 3, 16, 16).astype(np.float32)
  # 16 -> 5 does not divide: the reference falls back to F.interpolate.
  theirs = functional.interpolate(torch.from_numpy(kernel), 5).numpy()
  np.testing.assert_array_equal(resample.resample_patch_kernel(kernel, 5),
                                theirs)


def test_swin_window_and_patch_resampling(tmp_path, caplog):
  module = _timm("swin_tiny_patch4_window7_224", depths=(2, 1, 1, 1))
  state = {k: v.numpy() for k, v in module.state_dict().items()}
  kw = dict(img_size=32,
            patch_size=2,
            window_size=4,
            depths=(2, 1, 1, 1),
            num_classes=10)
  model = models.create("swin_tiny_patch4_window7_224", **kw)
  with caplog.at_level(logging.INFO):
    params = pretrained.load(_save(module, tmp_path / "s.safetensors"),
                             model,
                             init_params=_random_params(model, 0))
  name = "relative_position_bias_table"
  table = state[f"layers.0.blocks.1.attn.{name}"]
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(table.T.reshape(1, 3, 13, 13)),
      size=(7, 7),
      mode="bilinear")[0].numpy().reshape(3, 49).T
  np.testing.assert_allclose(params["layers_0"]["blocks_1"]["attn"][name],
                             expected,
                             atol=1e-6)
  # The last stage sees a 2x2 map, so its window is 2: a 3x3 table.
  assert params["layers_3"]["blocks_0"]["attn"][name].shape == (9, 24)
  np.testing.assert_allclose(params["patch_embed"]["proj"]["kernel"],
                             _reference_sum_pool(
                                 state["patch_embed.proj.weight"],
                                 2).transpose(2, 3, 1, 0),
                             atol=1e-5)
  assert f"resized layers.0.blocks.1.attn.{name}" in caplog.text


# --- other formats -----------------------------------------------------------


def test_pth_loads_like_safetensors_and_pickles_need_permission(tmp_path):
  module = _timm("deit_tiny_patch16_224",
                 depth=1,
                 img_size=32,
                 patch_size=4,
                 num_classes=10)
  model = models.create("deit_tiny_patch16_224",
                        depth=1,
                        img_size=32,
                        patch_size=4,
                        num_classes=10)
  expected = pretrained.load(_save(module, tmp_path / "m.safetensors"), model)
  plain = tmp_path / "m.pth"
  torch.save(module.state_dict(), plain)
  jax.tree.map(np.testing.assert_array_equal,
               pretrained.load(str(plain), model), expected)
  wrapped = tmp_path / "train.pth"  # a training checkpoint with objects
  torch.save({
      "model": module.state_dict(),
      "args": argparse.Namespace(lr=1)
  }, wrapped)
  with pytest.raises(UserError, match="allow_pickle=True") as info:
    pretrained.load(str(wrapped), model)
  assert "\n" not in str(info.value)
  jax.tree.map(np.testing.assert_array_equal,
               pretrained.load(str(wrapped), model, allow_pickle=True),
               expected)


def _google_npz(params, heads, path):
  """Our ViT params in vision_transformer's .npz naming (written by hand)."""
  p = jax.tree.map(np.asarray, params)
  w = {
      "embedding/kernel": p["patch_embed"]["kernel"],
      "embedding/bias": p["patch_embed"]["bias"],
      "cls": p["cls_token"],
      "Transformer/posembed_input/pos_embedding": p["pos_embed"],
      "Transformer/encoder_norm/scale": p["norm"]["scale"],
      "Transformer/encoder_norm/bias": p["norm"]["bias"],
      "head/kernel": p["head"]["kernel"],
      "head/bias": p["head"]["bias"]
  }
  i = 0
  while f"blocks_{i}" in p:
    b, t = p[f"blocks_{i}"], f"Transformer/encoderblock_{i}/"
    dim = b["norm1"]["scale"].shape[0]
    qkv_k = b["attn"]["qkv"]["kernel"].reshape(dim, 3, heads, dim // heads)
    qkv_b = b["attn"]["qkv"]["bias"].reshape(3, heads, dim // heads)
    for j, n in enumerate(("query", "key", "value")):
      w[f"{t}MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_k[:, j]
      w[f"{t}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j]
    w[f"{t}MultiHeadDotProductAttention_1/out/kernel"] = (
        b["attn"]["proj"]["kernel"].reshape(heads, dim // heads, dim))
    w[f"{t}MultiHeadDotProductAttention_1/out/bias"] = b["attn"]["proj"]["bias"]
    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      w[f"{t}{theirs}/scale"] = b[ours]["scale"]
      w[f"{t}{theirs}/bias"] = b[ours]["bias"]
    for r in range(2):
      w[f"{t}MlpBlock_3/Dense_{r}/kernel"] = b["mlp"][f"fc{r + 1}"]["kernel"]
      w[f"{t}MlpBlock_3/Dense_{r}/bias"] = b["mlp"][f"fc{r + 1}"]["bias"]
    i += 1
  np.savez(path, **w)


def test_npz_agrees_with_timms_own_npz_loader(tmp_path):
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  kw = dict(img_size=32, patch_size=4, depth=1, num_classes=10)
  model = models.create("vit_small_patch16_224", **kw)
  images = _images(model)
  params = _random_params(model, 5)
  path = str(tmp_path / "vit.npz")
  _google_npz(params, model.num_heads, path)
  module = _timm("vit_small_patch16_224", **kw)
  vision_transformer._load_weights(module, path)  # pylint: disable=protected-access
  loaded = pretrained.load(path, model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), loaded,
               params)
  diff = np.abs(
      _logits(model, loaded, images) -
      _timm_logits(module, model, images)).max()
  assert diff <= TOL, diff


# --- wrong checkpoints -------------------------------------------------------


@pytest.mark.parametrize("source, target, fragment", [
    (("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1))),
     ("deit_tiny_patch16_224", dict(depth=1)), "has no"),
    (("deit_small_patch16_224", dict(depth=1)),
     ("deit_tiny_patch16_224", dict(depth=1)), "has shape"),
    (("deit_tiny_patch16_224", dict(depth=2)),
     ("deit_tiny_patch16_224", dict(depth=1)), "params the model lacks"),
    (("convit_tiny", dict(depth=1)),
     ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1))), "has no"),
])
def test_wrong_family_or_size_is_a_one_line_user_error(source, target, fragment,
                                                       tmp_path):
  path = _save(_timm(source[0], **source[1]), tmp_path / "x.safetensors")
  with pytest.raises(UserError, match=fragment) as info:
    pretrained.load(path, models.create(target[0], **target[1]))
  assert "\n" not in str(info.value)
  assert "not a checkpoint of" in str(info.value)

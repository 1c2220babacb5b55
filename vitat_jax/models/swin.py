"""Swin Transformer (Liu et al. 2021) with the gradient gates (ARD and MLP).

Parameter names follow timm's current layout (patch merging at the start of
stages 1..3, `layers_i/blocks_j/attn/relative_position_bias_table`), so timm
state dicts map one to one. As in the reference code, stochastic depth sits
on the attention branch only, and windows larger than a stage's feature map
are clipped to it (no shift then), as timm does.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError
from vitat_jax.models import layers
from vitat_jax.models import registry
from vitat_jax.models.vit import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# torch.nn.LayerNorm's default, used throughout timm's Swin.
_LN_EPS = 1e-5
_MASK_VALUE = -100.0


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the (2w-1)^2 bias table (row-major offsets)."""
  coords = np.stack(
      np.meshgrid(np.arange(window), np.arange(window),
                  indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return rel[0] * (2 * window - 1) + rel[1]


def _partition(x, window):
  """[B, H, W, C] -> [B * windows, window * window, C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _reverse(windows, window, h, w):
  """Inverse of `_partition`."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """[windows, w*w, w*w] additive mask (0 / -100) for the shifted windows."""
  regions = np.zeros((1, resolution, resolution, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (hs, ws) in enumerate((h, w) for h in bounds for w in bounds):
    regions[:, hs, ws, :] = i
  regions = _partition(regions, window)[..., 0]
  diff = regions[:, None, :] - regions[:, :, None]
  return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


def stage_windows(resolution: int, window: int) -> Tuple[int, int]:
  """(window, shift) of a stage: clipped to the feature map as timm does."""
  if resolution <= window:
    return resolution, 0
  return window, window // 2


class WindowAttention(nn.Module):
  """Multi-head attention inside windows with a relative position bias."""
  num_heads: int
  window_size: int
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    windows, tokens, dim = x.shape
    head_dim = self.head_dim or dim // self.num_heads
    inner = head_dim * self.num_heads
    table = self.param("relative_position_bias_table",
                       nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1)**2, self.num_heads))
    index = relative_position_index(self.window_size).reshape(-1)
    bias = table[index].reshape(tokens, tokens, self.num_heads)
    bias = bias.transpose(2, 0, 1).astype(jnp.float32)

    qkv = nn.Dense(3 * inner,
                   use_bias=self.qkv_bias,
                   dtype=self.dtype,
                   kernel_init=self.kernel_init,
                   precision=self.precision,
                   name="qkv")(x)
    qkv = qkv.reshape(windows, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk",
                        q * head_dim**-0.5,
                        k,
                        precision=self.precision)
    logits = logits.astype(jnp.float32) + bias
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, self.num_heads, tokens, tokens)
      logits = logits + jnp.asarray(mask)[None, :, None]
      logits = logits.reshape(-1, self.num_heads, tokens, tokens)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attn_dropout, deterministic=not train)(weights)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v,
                     precision=self.precision).reshape(windows, tokens, inner)
    out = nn.Dense(dim,
                   dtype=self.dtype,
                   kernel_init=self.kernel_init,
                   precision=self.precision,
                   name="proj")(out)
    return nn.Dropout(self.proj_dropout, deterministic=not train)(out)


class SwinBlock(nn.Module):
  """(Shifted-)window attention block; the attention branch (ARD gate and
  drop-path) and the MLP branch each gated as `layers.Block`'s."""
  num_heads: int
  window_size: int
  shift_size: int = 0
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, attn_keep=None, mlp_keep=None, train: bool = False):
    _, height, width, dim = x.shape
    window, shift = self.window_size, self.shift_size
    branch = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm1")(x)
    if shift:
      branch = jnp.roll(branch, (-shift, -shift), axis=(1, 2))
    mask = shifted_window_mask(height, window, shift) if shift else None
    branch = WindowAttention(self.num_heads,
                             window,
                             self.head_dim,
                             self.qkv_bias,
                             self.attn_dropout,
                             self.dropout,
                             dtype=self.dtype,
                             kernel_init=self.kernel_init,
                             precision=self.precision,
                             name="attn")(_partition(branch, window),
                                          mask,
                                          train=train)
    branch = _reverse(branch, window, height, width)
    if shift:
      branch = jnp.roll(branch, (shift, shift), axis=(1, 2))
    branch = layers.gate_gradient(branch, attn_keep)
    rng = self.make_rng("dropout") if train and self.drop_path_rate else None
    x = x + layers.drop_path(branch, self.drop_path_rate, rng, not train)
    branch = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm2")(x)
    branch = layers.Mlp(int(dim * self.mlp_ratio),
                        self.dropout,
                        dtype=self.dtype,
                        kernel_init=self.kernel_init,
                        precision=self.precision,
                        name="mlp")(branch, train=train)
    return x + layers.gate_gradient(branch, mlp_keep)


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (timm's order), normalised, projected."""
  out_dim: int
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    # timm orders the 4C features as (w offset, h offset, channel).
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x)
    return nn.Dense(self.out_dim,
                    use_bias=False,
                    dtype=self.dtype,
                    kernel_init=self.kernel_init,
                    precision=self.precision,
                    name="reduction")(x)


class PatchEmbed(nn.Module):
  """Patch projection then LayerNorm (timm's `patch_embed.proj/norm`)."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32
  conv_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    x = layers.PatchEmbedding(self.embed_dim,
                              self.patch_size,
                              kernel_init=self.conv_init,
                              name="proj")(x)
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x)


class SwinStage(nn.Module):
  """Optional patch merging, then `depth` blocks alternating the shift."""
  dim: int
  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rates: Sequence[float] = ()
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, attn_keep=None, mlp_keep=None, *, train: bool = False):
    # `train` (argument 4, counting the module) must stay a Python bool.
    block = nn.remat(SwinBlock,
                     static_argnums=(4,)) if self.remat else (SwinBlock)
    if self.downsample:
      x = PatchMerging(self.dim,
                       dtype=self.dtype,
                       kernel_init=self.kernel_init,
                       precision=self.precision,
                       name="downsample")(x)
    window, shift = stage_windows(x.shape[1], self.window_size)
    for j in range(self.depth):
      keeps = [None if k is None else k[j] for k in (attn_keep, mlp_keep)]
      x = block(self.num_heads,
                window,
                shift if j % 2 else 0,
                self.head_dim,
                self.mlp_ratio,
                self.qkv_bias,
                self.dropout,
                self.attn_dropout,
                float(self.drop_path_rates[j]),
                dtype=self.dtype,
                kernel_init=self.kernel_init,
                precision=self.precision,
                name=f"blocks_{j}")(x, *keeps, train)
    return x


class SwinTransformer(nn.Module):
  """Swin: patch embedding, 4 stages of window attention, mean-pooled head.

  Keywords are timm's: `embed_dim` is the first stage's width (doubled at
  every merge), `depths` and `num_heads` give one value per stage.
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Tuple[int, ...] = (2, 2, 6, 2)
  num_heads: Tuple[int, ...] = (3, 6, 12, 24)
  head_dim: Optional[int] = None
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
  std: Tuple[float, ...] = IMAGENET_DEFAULT_STD
  # "trunc_normal" (the reference's, timm's) or "xavier_uniform".
  weight_init: str = "trunc_normal"
  dtype: Any = jnp.float32
  # Of every dot but the patch embedding's (always HIGHEST): see vit.py.
  precision: Optional[str] = None
  # Recompute each block's activations in the backward pass (as ViT's).
  remat: bool = False

  def __post_init__(self):
    # timm keywords often arrive as lists; module attributes stay hashable.
    for field in ("depths", "num_heads"):
      value = getattr(self, field)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, field, tuple(int(v) for v in value))
    super().__post_init__()

  @property
  def num_attention_blocks(self) -> int:
    """Length of the ARD keep-mask `attn_keep` (all blocks, all stages)."""
    return int(sum(self.depths))

  @property
  def num_mlp_blocks(self) -> int:
    """Length of the MLP keep-mask `mlp_keep` (one MLP per block)."""
    return int(sum(self.depths))

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.img_size // self.patch_size

  def stage_resolutions(self) -> Tuple[int, ...]:
    return tuple(self.grid_size // 2**i for i in range(len(self.depths)))

  def check_config(self):
    """Raises a one-line UserError for sizes that cannot build a model."""
    layers.check_patch_and_stats(self.img_size, self.patch_size, self.mean,
                                 self.std)
    layers.check_weight_init(self.weight_init)
    layers.check_precision(self.precision)
    if len(self.depths) != len(self.num_heads):
      raise UserError(f"depths={tuple(self.depths)} and num_heads="
                      f"{tuple(self.num_heads)} need one entry per stage each")
    if not isinstance(self.window_size, int) or self.window_size <= 0:
      raise UserError(f"window_size={self.window_size!r} must be a positive "
                      "int (one square window for all stages)")
    merges = 2**(len(self.depths) - 1)
    if self.grid_size % merges:
      raise UserError(
          f"the {self.grid_size}x{self.grid_size} patch grid cannot be halved "
          f"{len(self.depths) - 1} times: choose img_size/patch_size "
          f"divisible by {merges}")
    for i, res in enumerate(self.stage_resolutions()):
      window, _ = stage_windows(res, self.window_size)
      if res % window:
        raise UserError(
            f"window_size={self.window_size} does not divide stage {i}'s "
            f"{res}x{res} feature map: choose img_size, patch_size and "
            "window_size so that every stage is a whole number of windows")
      dim = self.embed_dim * 2**i
      if self.head_dim is None and dim % self.num_heads[i]:
        raise UserError(
            f"stage {i} width {dim} is not divisible by num_heads="
            f"{self.num_heads[i]}: choose num_heads dividing embed_dim*2^i")

  @nn.compact
  def __call__(self,
               images,
               attn_keep=None,
               mlp_keep=None,
               *,
               train: bool = False):
    layers.check_call(self, images, attn_keep, mlp_keep)
    # Normalisation and patch embedding in float32, HIGHEST (see vit.py).
    x = layers.normalize(images.astype(jnp.float32), self.mean, self.std)
    kernel_init = layers.dense_kernel_init(self.weight_init)
    x = PatchEmbed(self.patch_size,
                   self.embed_dim,
                   dtype=jnp.float32,
                   conv_init=layers.conv_init(self.weight_init),
                   name="patch_embed")(x).astype(self.dtype)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    rates = np.linspace(0.0, self.drop_path_rate, self.num_attention_blocks)
    start = 0
    for i, depth in enumerate(self.depths):
      keeps = [
          None if k is None else k[start:start + depth]
          for k in (attn_keep, mlp_keep)
      ]
      x = SwinStage(self.embed_dim * 2**i,
                    depth,
                    self.num_heads[i],
                    self.window_size,
                    downsample=i > 0,
                    head_dim=self.head_dim,
                    mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias,
                    dropout=self.proj_drop_rate,
                    attn_dropout=self.attn_drop_rate,
                    drop_path_rates=tuple(rates[start:start + depth]),
                    dtype=self.dtype,
                    kernel_init=kernel_init,
                    precision=self.precision,
                    remat=self.remat,
                    name=f"layers_{i}")(x, *keeps, train=train)
      start += depth
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x)
    x = x.mean(axis=(1, 2))
    if self.num_classes <= 0:
      return x.astype(jnp.float32)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes,
                      dtype=self.dtype,
                      kernel_init=kernel_init,
                      precision=self.precision,
                      name="head")(x)
    return logits.astype(jnp.float32)


# name: (embed_dim, depths, num_heads, window, img_size, num_classes)
_SWIN_VARIANTS = {
    "swin_tiny_patch4_window7_224":
        (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, 1000),
    "swin_small_patch4_window7_224":
        (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224, 1000),
    "swin_base_patch4_window7_224":
        (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224, 1000),
    "swin_base_patch4_window12_384":
        (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384, 1000),
    "swin_large_patch4_window7_224":
        (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224, 1000),
    "swin_large_patch4_window12_384":
        (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384, 1000),
    # ImageNet-22k checkpoints (21841 classes), timm's deprecated names.
    "swin_base_patch4_window7_224_in22k":
        (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224, 21841),
    "swin_base_patch4_window12_384_in22k":
        (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384, 21841),
}


def _register_all():
  for name, (dim, depths, heads, window, res,
             classes) in _SWIN_VARIANTS.items():
    registry.register(name,
                      SwinTransformer,
                      embed_dim=dim,
                      depths=depths,
                      num_heads=heads,
                      window_size=window,
                      img_size=res,
                      num_classes=classes,
                      patch_size=4)


_register_all()

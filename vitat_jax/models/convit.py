"""ConViT (d'Ascoli et al. 2021) with the gradient gates (ARD and MLP).

The first `local_up_to_layer` blocks use gated positional self-attention
(GPSA): per head, a learned gate mixes content attention with a positional
attention initialised to look at a small neighbourhood (locality init). The
class token joins after those blocks; plain multi-head attention follows.
Keywords are timm's: `embed_dim` is the width per head (timm multiplies it by
`num_heads`). As in the reference, drop-path sits on the attention branch.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError
from vitat_jax.models import layers
from vitat_jax.models import registry
from vitat_jax.models.vit import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def relative_indices(grid: int) -> np.ndarray:
  """[N, N, 3] (dx, dy, dx^2 + dy^2) between row-major patches of a grid."""
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  dx = (cols[None, :] - cols[:, None]).astype(np.float32)
  dy = (rows[None, :] - rows[:, None]).astype(np.float32)
  return np.stack([dx, dy, dx**2 + dy**2], axis=-1)


def locality_init(locality_strength: float):
  """pos_proj kernel [3, heads]: head h attends around offset (h1, h2).

  The first floor(sqrt(heads))^2 heads get centres on a square lattice; the
  others keep a small random init, as in timm's `GPSA.local_init`.
  """

  def init(key, shape, dtype=jnp.float32):
    heads = shape[1]
    lattice = np.zeros(shape, np.float32)
    placed = np.zeros(shape, bool)
    size = int(heads**0.5)
    center = (size - 1) / 2 if size % 2 == 0 else size // 2
    for h1 in range(size):
      for h2 in range(size):
        head = h1 + size * h2
        lattice[:, head] = (2 * (h2 - center), 2 * (h1 - center), -1)
        placed[:, head] = True
    noise = nn.initializers.truncated_normal(0.02)(key, shape, jnp.float32)
    kernel = jnp.where(placed, lattice, noise) * locality_strength
    return kernel.astype(dtype)

  return init


def _identity_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(*shape, dtype=dtype)


class GPSA(nn.Module):
  """Gated positional self-attention (timm's `qk`, `v`, `pos_proj`, gate)."""
  num_heads: int
  qkv_bias: bool = False
  locality_strength: float = 1.0
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    grid = int(round(tokens**0.5))
    dense = lambda n, name, **kw: nn.Dense(  # pylint: disable=g-long-lambda
        n,
        dtype=self.dtype,
        precision=self.precision,
        name=name,
        **{
            "kernel_init": self.kernel_init,
            **kw
        })
    qk = dense(2 * dim, "qk", use_bias=self.qkv_bias)(x)
    qk = qk.reshape(batch, tokens, 2, self.num_heads, head_dim)
    q, k = qk[:, :, 0], qk[:, :, 1]
    patch = jnp.einsum("bqhd,bkhd->bhqk",
                       q * head_dim**-0.5,
                       k,
                       precision=self.precision)
    patch = jax.nn.softmax(patch.astype(jnp.float32), axis=-1)
    pos = dense(self.num_heads,
                "pos_proj",
                kernel_init=locality_init(self.locality_strength))(jnp.asarray(
                    relative_indices(grid), self.dtype))
    pos = jax.nn.softmax(pos.astype(jnp.float32).transpose(2, 0, 1), axis=-1)
    gate = self.param("gating_param", nn.initializers.ones, (self.num_heads,))
    gate = jax.nn.sigmoid(gate.astype(jnp.float32))[:, None, None]
    weights = (1.0 - gate) * patch + gate * pos[None]
    weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = nn.Dropout(self.attn_dropout,
                         deterministic=not train)(weights.astype(self.dtype))
    v = dense(dim, "v", use_bias=self.qkv_bias, kernel_init=_identity_init)(x)
    v = v.reshape(batch, tokens, self.num_heads, head_dim)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v,
                     precision=self.precision).reshape(batch, tokens, dim)
    out = dense(dim, "proj")(out)
    return nn.Dropout(self.proj_dropout, deterministic=not train)(out)


class ConViTBlock(nn.Module):
  """Pre-norm block with GPSA or MHSA; the attention branch (ARD gate and
  drop-path) and the MLP branch each gated as `layers.Block`'s."""
  num_heads: int
  use_gpsa: bool
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  locality_strength: float = 1.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = layers.dense_init
  precision: Optional[str] = None
  fused_attention: Optional[bool] = None  # None: fused off the CPU

  @nn.compact
  def __call__(self, x, attn_keep=None, mlp_keep=None, *, train: bool = False):
    dim = x.shape[-1]
    branch = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    if self.use_gpsa:
      attn = GPSA(self.num_heads,
                  self.qkv_bias,
                  self.locality_strength,
                  self.attn_dropout,
                  self.dropout,
                  dtype=self.dtype,
                  kernel_init=self.kernel_init,
                  precision=self.precision,
                  name="attn")
    else:
      attn = layers.Attention(self.num_heads,
                              self.qkv_bias,
                              None,
                              self.attn_dropout,
                              self.dropout,
                              dtype=self.dtype,
                              kernel_init=self.kernel_init,
                              precision=self.precision,
                              fused=self.fused_attention,
                              name="attn")
    branch = layers.gate_gradient(attn(branch, train=train), attn_keep)
    rng = self.make_rng("dropout") if train and self.drop_path_rate else None
    x = x + layers.drop_path(branch, self.drop_path_rate, rng, not train)
    branch = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    branch = layers.Mlp(int(dim * self.mlp_ratio),
                        self.dropout,
                        dtype=self.dtype,
                        kernel_init=self.kernel_init,
                        precision=self.precision,
                        name="mlp")(branch, train=train)
    return x + layers.gate_gradient(branch, mlp_keep)


class ConViT(nn.Module):
  """ConViT: GPSA blocks, then the class token, then MHSA blocks."""
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 48  # per head, as timm's keyword
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  local_up_to_layer: int = 3
  locality_strength: float = 1.0
  use_pos_embed: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
  std: Tuple[float, ...] = IMAGENET_DEFAULT_STD
  # "trunc_normal" (the reference's, timm's) or "xavier_uniform".
  weight_init: str = "trunc_normal"
  dtype: Any = jnp.float32
  # Of every dot but the patch embedding's (always HIGHEST): see vit.py.
  precision: Optional[str] = None
  # The MHSA blocks' attention through jax.nn.dot_product_attention (GPSA
  # mixes in positional attention, so it stays explicit).
  fused_attention: Optional[bool] = None  # None: fused off the CPU

  @property
  def width(self) -> int:
    return self.embed_dim * self.num_heads

  @property
  def num_attention_blocks(self) -> int:
    """Length of the ARD keep-mask `attn_keep` (GPSA and MHSA blocks)."""
    return self.depth

  @property
  def num_mlp_blocks(self) -> int:
    """Length of the MLP keep-mask `mlp_keep` (one MLP per block)."""
    return self.depth

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.img_size // self.patch_size

  def check_config(self):
    """Raises a one-line UserError for sizes that cannot build a model."""
    layers.check_patch_and_stats(self.img_size, self.patch_size, self.mean,
                                 self.std)
    layers.check_weight_init(self.weight_init)
    layers.check_precision(self.precision)
    if not 0 <= self.local_up_to_layer <= self.depth:
      raise UserError(f"local_up_to_layer={self.local_up_to_layer} must lie in "
                      f"[0, depth={self.depth}]")
    if self.embed_dim <= 0 or self.num_heads <= 0:
      raise UserError("embed_dim (width per head) and num_heads must be "
                      "positive")

  @nn.compact
  def __call__(self,
               images,
               attn_keep=None,
               mlp_keep=None,
               *,
               train: bool = False):
    layers.check_call(self, images, attn_keep, mlp_keep)
    width = self.width
    # Normalisation and patch embedding in float32, HIGHEST (see vit.py).
    x = layers.normalize(images.astype(jnp.float32), self.mean, self.std)
    kernel_init = layers.dense_kernel_init(self.weight_init)
    x = layers.PatchEmbedding(width,
                              self.patch_size,
                              kernel_init=layers.conv_init(self.weight_init),
                              name="patch_embed")(x).astype(self.dtype)
    batch = x.shape[0]
    x = x.reshape(batch, -1, width)
    # The "xavier_uniform" scheme keeps this family's earlier token init.
    token_init = layers.token_init(self.weight_init,
                                   nn.initializers.truncated_normal(0.02))
    cls = self.param("cls_token", token_init, (1, 1, width))
    if self.use_pos_embed:
      pos_embed = self.param("pos_embed", token_init, (1, x.shape[1], width))
      x = x + pos_embed.astype(self.dtype)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    for i in range(self.depth):
      if i == self.local_up_to_layer:
        x = jnp.concatenate(
            [jnp.broadcast_to(cls, (batch, 1, width)).astype(self.dtype), x],
            axis=1)
      keeps = [None if k is None else k[i] for k in (attn_keep, mlp_keep)]
      x = ConViTBlock(self.num_heads,
                      i < self.local_up_to_layer,
                      self.mlp_ratio,
                      self.qkv_bias,
                      self.locality_strength,
                      self.drop_rate,
                      self.attn_drop_rate,
                      float(rates[i]),
                      dtype=self.dtype,
                      kernel_init=kernel_init,
                      precision=self.precision,
                      fused_attention=self.fused_attention,
                      name=f"blocks_{i}")(x, *keeps, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    # With every block local the class token was never inserted: timm then
    # still reads token 0, which is a patch token.
    x = x[:, 0]
    if self.num_classes <= 0:
      return x.astype(jnp.float32)
    logits = nn.Dense(self.num_classes,
                      dtype=self.dtype,
                      kernel_init=kernel_init,
                      precision=self.precision,
                      name="head")(x)
    return logits.astype(jnp.float32)


# size: num_heads (embed_dim 48 per head, depth 12, 10 local blocks)
_CONVIT_HEADS = {"tiny": 4, "small": 9, "base": 16}


def _register_all():
  for size, heads in _CONVIT_HEADS.items():
    registry.register(f"convit_{size}",
                      ConViT,
                      embed_dim=48,
                      num_heads=heads,
                      local_up_to_layer=10,
                      locality_strength=1.0,
                      patch_size=16,
                      img_size=224)


_register_all()

"""Building blocks shared by the transformer families.

Parameter names follow timm's module names (`qkv`, `proj`, `fc1`, `fc2`,
`norm1`, ...) so that converted checkpoints map onto them one to one.
"""

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitat_jax.errors import UserError

Dtype = Any

# Weight-initialisation schemes a model can be created with (`weight_init=`).
# "trunc_normal" is the reference's (timm's): linear kernels, class/position
# tokens ~ trunc_normal(std 0.02) with zero biases. timm truncates at +-2 in
# absolute units, i.e. at +-100 std, so this is a plain normal in practice.
# The patch-embedding convolution keeps PyTorch's default (kaiming-uniform
# with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))), which timm does not touch.
# "xavier_uniform" (google-research ViT's linear init) is this project's own
# scheme for training small models from scratch: from std 0.02 the digits
# quickstart model learns later and less (configs/quickstart.py).
WEIGHT_INITS = ("trunc_normal", "xavier_uniform")
_TIMM_STD = 0.02


def dense_kernel_init(scheme: str):
  """The initializer of dense kernels under `scheme`."""
  if scheme == "trunc_normal":
    return nn.initializers.normal(_TIMM_STD)
  return nn.initializers.xavier_uniform()


def token_init(scheme: str, xavier_default=nn.initializers.zeros):
  """Class / distillation tokens and position embeddings under `scheme`.

  `xavier_default` is what the "xavier_uniform" scheme has always used for
  this parameter, kept so that its runs initialise exactly as before.
  """
  if scheme == "trunc_normal":
    return nn.initializers.normal(_TIMM_STD)
  return xavier_default


def conv_init(scheme: str):
  """The patch-embedding kernel: PyTorch's Conv2d default, or Flax's."""
  if scheme == "trunc_normal":
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
  return nn.initializers.lecun_normal()


def check_weight_init(scheme: str):
  if scheme not in WEIGHT_INITS:
    raise UserError(f"weight_init={scheme!r}: use one of "
                    f"{', '.join(WEIGHT_INITS)}")


# Default of sub-modules built on their own (their parent passes its own).
dense_init = dense_kernel_init("trunc_normal")

# A model's `precision`: that of every dot and einsum except the patch
# embedding's (always HIGHEST); None is the backend's default (see
# docs/precision.md and `models.precision`).
PRECISIONS = (None, "default", "high", "highest")


def check_precision(precision):
  if precision not in PRECISIONS:
    raise UserError(f"precision={precision!r}: use None (the backend's "
                    "default), 'default', 'high' or 'highest'")


def gate_gradient(branch: jax.Array, keep: Optional[jax.Array]) -> jax.Array:
  """A branch's gradient gate: forward value unchanged, gradient scaled by
  `keep` (None: no gate).

  `keep * a + (1 - keep) * stop_gradient(a)` equals `a` in the forward pass
  for keep in {0, 1}; in the backward pass only the `keep` part carries the
  gradient, so keep = 0 drops the branch's gradient entirely. ARD gates the
  attention branches with it (`attn_keep`), the MLP gate the MLP branches
  (`mlp_keep`).
  """
  if keep is None:
    return branch
  keep = keep.astype(branch.dtype)
  return keep * branch + (1 - keep) * jax.lax.stop_gradient(branch)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written with erf as PyTorch's `nn.GELU` is.

  Same function as `nn.gelu(x, approximate=False)`, whose erfc form costs
  XLA CPU about twice as much (benchmarks/NOTES.md).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * 2**-0.5))


def drop_path(x: jax.Array, rate: float, rng: Optional[jax.Array],
              deterministic: bool) -> jax.Array:
  """Stochastic depth: drops the whole branch per example, rescales the rest."""
  if deterministic or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep_prob,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep_prob, jnp.zeros_like(x))


class Mlp(nn.Module):
  """Two dense layers with exact (erf) GELU, as timm's `Mlp`."""
  hidden_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Any = dense_init
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim,
                 dtype=self.dtype,
                 kernel_init=self.kernel_init,
                 precision=self.precision,
                 name="fc1")(x)
    x = gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(out_dim,
                 dtype=self.dtype,
                 kernel_init=self.kernel_init,
                 precision=self.precision,
                 name="fc2")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


def attention_implementation(dtype) -> str:
  """`jax.nn.dot_product_attention`'s kernel: cuDNN's fused (flash) one for
  bfloat16/float16 on a GPU, XLA's (einsum, float32 softmax, einsum)
  everywhere else; XLA's is also what float32 gets on a GPU, since cuDNN's
  takes half precision only."""
  if (jax.default_backend() == "gpu" and
      jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return "cudnn"
  return "xla"


def use_fused_attention(fused: Optional[bool]) -> bool:
  """Whether attention goes through `jax.nn.dot_product_attention`: as
  `fused` says, or (None) everywhere but on the CPU. On XLA:CPU the fused
  call measured 4-6% slower than the explicit heads-first path (DeiT-Ti,
  224 px batch 2 and 32 px batch 32; docs/performance.md), and there is no
  kernel to gain."""
  if fused is None:
    return jax.default_backend() != "cpu"
  return bool(fused)


def fused_attention(q, k, v, *, dtype, precision: Optional[str]):
  """softmax(q k^T) v over [batch, tokens, heads, head_dim] (q pre-scaled)
  through `jax.nn.dot_product_attention`.

  XLA's implementation sets no precision of its own on float32 dots, so
  the model's is applied as the default around the call. What cuDNN
  refuses at trace time (head_dim above 128 or not a multiple of 8, no
  cuDNN) falls back to XLA's.
  """
  implementation = attention_implementation(dtype)
  scope = (contextlib.nullcontext()
           if precision is None else jax.default_matmul_precision(precision))
  with scope:
    if implementation == "cudnn":
      try:
        return jax.nn.dot_product_attention(q,
                                            k,
                                            v,
                                            scale=1.0,
                                            implementation="cudnn")
      except (NotImplementedError, RuntimeError):
        pass
    return jax.nn.dot_product_attention(q,
                                        k,
                                        v,
                                        scale=1.0,
                                        implementation="xla")


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  `fused=True` computes the attention itself with
  `jax.nn.dot_product_attention` (`fused_attention`); attention dropout
  while training needs the weights, so it takes the explicit path, as
  `fused=False` always does; None (the default) is fused off the CPU
  (`use_fused_attention`). Both give the same values (float32: to 1e-6).
  """
  num_heads: int
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Any = dense_init
  precision: Optional[str] = None
  fused: Optional[bool] = None
  # Only the first `queries` tokens attend (None: all): the outputs of the
  # others, which a model's last block does not pass on, are not computed.
  queries: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    batch, tokens, dim = x.shape
    queries = tokens if self.queries is None else self.queries
    head_dim = dim // self.num_heads
    scale = self.qk_scale if self.qk_scale is not None else head_dim**-0.5
    qkv = nn.Dense(3 * dim,
                   use_bias=self.qkv_bias,
                   dtype=self.dtype,
                   kernel_init=self.kernel_init,
                   precision=self.precision,
                   name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    if use_fused_attention(
        self.fused) and not (train and self.attn_dropout > 0):
      q, k, v = qkv[:, :queries, 0], qkv[:, :, 1], qkv[:, :, 2]
      out = fused_attention(q * scale,
                            k,
                            v,
                            dtype=self.dtype,
                            precision=self.precision)
    else:
      # Heads before tokens, once: the batched matmuls below then need no
      # operand transposes (about 5% of an attack step on CPU, NOTES.md).
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      q = q[:, :, :queries]
      logits = jnp.einsum("bhqd,bhkd->bhqk",
                          q * scale,
                          k,
                          precision=self.precision)
      weights = jax.nn.softmax(logits.astype(jnp.float32),
                               axis=-1).astype(self.dtype)
      weights = nn.Dropout(self.attn_dropout, deterministic=not train)(weights)
      out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=self.precision)
      out = out.transpose(0, 2, 1, 3)
    out = nn.Dense(dim,
                   dtype=self.dtype,
                   kernel_init=self.kernel_init,
                   precision=self.precision,
                   name="proj")(out.reshape(batch, queries, dim))
    return nn.Dropout(self.proj_dropout, deterministic=not train)(out)


class Block(nn.Module):
  """Pre-norm transformer block with gradient gates on both branches.

  `attn_keep` (ARD) and `mlp_keep` are this block's scalar keep values, or
  None (no gate); the skip path is never gated. As in the reference models,
  stochastic depth sits on the attention branch only.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Any = dense_init
  layer_norm_eps: float = 1e-6
  precision: Optional[str] = None
  fused_attention: Optional[bool] = None  # None: fused off the CPU
  # The block returns its first `outputs` tokens only (None: all): a
  # model's last block before a class-token head (`Attention.queries`).
  outputs: Optional[int] = None

  @nn.compact
  def __call__(self, x, attn_keep=None, mlp_keep=None, train: bool = False):
    # `train` is positional too, so that nn.remat can mark it static.
    dim = x.shape[-1]
    branch = nn.LayerNorm(epsilon=self.layer_norm_eps,
                          dtype=self.dtype,
                          name="norm1")(x)
    branch = Attention(self.num_heads,
                       self.qkv_bias,
                       self.qk_scale,
                       self.attn_dropout,
                       self.dropout,
                       dtype=self.dtype,
                       kernel_init=self.kernel_init,
                       precision=self.precision,
                       fused=self.fused_attention,
                       queries=self.outputs,
                       name="attn")(branch, train=train)
    if self.outputs is not None:
      x = x[:, :self.outputs]
    branch = gate_gradient(branch, attn_keep)
    rng = self.make_rng("dropout") if train and self.drop_path_rate else None
    x = x + drop_path(branch, self.drop_path_rate, rng, not train)
    branch = nn.LayerNorm(epsilon=self.layer_norm_eps,
                          dtype=self.dtype,
                          name="norm2")(x)
    branch = Mlp(int(dim * self.mlp_ratio),
                 self.dropout,
                 dtype=self.dtype,
                 kernel_init=self.kernel_init,
                 precision=self.precision,
                 name="mlp")(branch, train=train)
    return x + gate_gradient(branch, mlp_keep)


class PatchEmbedding(nn.Module):
  """timm's patch `Conv2d` (kernel == stride, no padding) as patchify and
  one matmul, in float32 at HIGHEST precision whatever the model's.

  An attack's 0.25/255 steps must survive it, for about 1% of the FLOPs.
  As a convolution, its input gradient compiles on XLA:CPU to a
  base-dilated convolution, ~50x slower than this reshape and matmul
  (benchmarks/patch_embedding.py). `kernel` keeps the convolution's
  [p, p, C, D] layout and initialiser, so checkpoints and seeds map onto
  it as before. [B, H, W, C] -> [B, H / p, W / p, D].
  """
  features: int
  patch_size: int
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    p = self.patch_size
    kernel = self.param("kernel", self.kernel_init,
                        (p, p, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    x = x.astype(jnp.float32).reshape(batch, height // p, p, width // p, p,
                                      channels)
    # Each patch flattened in the kernel's (row, column, channel) order.
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // p, width // p,
                                              p * p * channels)
    x = jnp.dot(x,
                kernel.reshape(p * p * channels, self.features),
                precision=jax.lax.Precision.HIGHEST)
    return x + bias


def check_patch_and_stats(img_size: int, patch_size: int, mean, std):
  """One-line UserErrors shared by every family's `check_config`."""
  if patch_size <= 0 or img_size % patch_size:
    raise UserError(
        f"patch_size={patch_size} does not divide img_size={img_size}: "
        "choose a patch size that divides the image size")
  if len(mean) != 3 or len(std) != 3:
    raise UserError("mean and std need one value per RGB channel")


def check_call(model, images, attn_keep, mlp_keep):
  """The input checks of every family's `__call__` (at trace time)."""
  size = model.img_size
  if images.shape[1:3] != (size, size):
    raise ValueError(
        f"model built for {size}x{size} images, got "
        f"{images.shape[1]}x{images.shape[2]}; create it with img_size="
        f"{images.shape[1]}")
  for name, keep, length in (("attn_keep", attn_keep,
                              model.num_attention_blocks),
                             ("mlp_keep", mlp_keep, model.num_mlp_blocks)):
    if keep is not None and keep.shape != (length,):
      raise ValueError(f"{name} must have shape ({length},), got "
                       f"{keep.shape}")


def normalize(x: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """Maps [0, 1] pixels to the model's input statistics (NHWC)."""
  mean = jnp.asarray(mean, x.dtype)
  std = jnp.asarray(std, x.dtype)
  return (x - mean) / std

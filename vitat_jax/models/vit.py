"""Vision Transformer and DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021).

One module, sizes from a variant table, registered under timm's names. The
model takes images in [0, 1] (NHWC), normalises them with its own mean/std,
and takes the gradient keep-masks `attn_keep` (ARD) and `mlp_keep` (shape
[depth] each, or None) as ordinary arguments.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitat_jax.errors import UserError
from vitat_jax.models import layers
from vitat_jax.models import registry

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
# The class count of the ImageNet-21k checkpoints that carry a pre-logits
# layer; fine-tuned to any other count the layer is dropped (the reference's
# _create_vision_transformer), so `representation_size` only applies here.
IN21K_CLASSES = 21843


class VisionTransformer(nn.Module):
  """ViT with class token, learned position embedding and pre-norm blocks.

  `distilled=True` adds DeiT's distillation token and head; the two heads'
  logits are averaged (DeiT's inference rule, used here in training too since
  no teacher is involved in adversarial training).
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  # The tanh pre-logits layer of the in21k checkpoints; built only when
  # num_classes == IN21K_CLASSES, as the reference does (see `has_pre_logits`).
  representation_size: Optional[int] = None
  distilled: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  mean: Tuple[float, ...] = IMAGENET_INCEPTION_MEAN
  std: Tuple[float, ...] = IMAGENET_INCEPTION_STD
  # LayerNorm epsilon: 1e-6 (timm's ViT); the legacy ViT-S uses torch's 1e-5.
  layer_norm_eps: float = 1e-6
  # "trunc_normal" (the reference's, timm's) or "xavier_uniform".
  weight_init: str = "trunc_normal"
  dtype: Any = jnp.float32
  # Rematerialise each block: its activations are recomputed in the backward
  # pass instead of stored (less memory, one more forward pass of compute).
  remat: bool = False
  # Of every dot but the patch embedding's (always HIGHEST): None (the
  # backend's default), "default", "high" or "highest" (docs/precision.md).
  precision: Optional[str] = None
  # Attention through jax.nn.dot_product_attention (layers.Attention).
  fused_attention: Optional[bool] = None  # None: fused off the CPU

  @property
  def num_attention_blocks(self) -> int:
    """Length of the ARD keep-mask `attn_keep` this model takes."""
    return self.depth

  @property
  def num_mlp_blocks(self) -> int:
    """Length of the MLP keep-mask `mlp_keep` (one MLP per block)."""
    return self.depth

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.img_size // self.patch_size

  @property
  def has_pre_logits(self) -> bool:
    """The pre-logits layer exists only at the in21k class count."""
    return (self.representation_size is not None and
            self.num_classes == IN21K_CLASSES)

  def check_config(self):
    """Raises a one-line UserError for sizes that cannot build a model."""
    layers.check_patch_and_stats(self.img_size, self.patch_size, self.mean,
                                 self.std)
    layers.check_weight_init(self.weight_init)
    layers.check_precision(self.precision)
    if self.embed_dim % self.num_heads:
      raise UserError(
          f"embed_dim={self.embed_dim} is not divisible by num_heads="
          f"{self.num_heads}: choose num_heads dividing embed_dim")

  @nn.compact
  def __call__(self,
               images,
               attn_keep=None,
               mlp_keep=None,
               *,
               train: bool = False):
    layers.check_call(self, images, attn_keep, mlp_keep)
    scheme = self.weight_init
    kernel_init = layers.dense_kernel_init(scheme)
    # Normalisation and patch embedding in float32 at HIGHEST precision
    # whatever the compute dtype: an attack's small steps (0.25/255) survive
    # them (bf16 input rounding would erase them), for about 1% of the FLOPs.
    x = layers.normalize(images.astype(jnp.float32), self.mean, self.std)
    x = layers.PatchEmbedding(self.embed_dim,
                              self.patch_size,
                              kernel_init=layers.conv_init(scheme),
                              name="patch_embed")(x).astype(self.dtype)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.embed_dim)

    prefix = [
        self.param("cls_token", layers.token_init(scheme),
                   (1, 1, self.embed_dim))
    ]
    if self.distilled:
      prefix.append(
          self.param(
              "dist_token",
              layers.token_init(scheme, nn.initializers.xavier_uniform()),
              (1, 1, self.embed_dim)))
    prefix = [
        jnp.broadcast_to(t, (batch, 1, self.embed_dim)).astype(self.dtype)
        for t in prefix
    ]
    x = jnp.concatenate(prefix + [x], axis=1)
    pos_embed = self.param(
        "pos_embed", layers.token_init(scheme,
                                       nn.initializers.xavier_uniform()),
        (1, x.shape[1], self.embed_dim))
    x = x + pos_embed.astype(self.dtype)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

    path_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    # `train` (argument 4, counting the module) must stay a Python bool.
    block = nn.remat(layers.Block,
                     static_argnums=(4,)) if self.remat else (layers.Block)
    for i in range(self.depth):
      keeps = [None if k is None else k[i] for k in (attn_keep, mlp_keep)]
      x = block(self.num_heads,
                self.mlp_ratio,
                self.qkv_bias,
                self.qk_scale,
                self.drop_rate,
                self.attn_drop_rate,
                float(path_rates[i]),
                dtype=self.dtype,
                kernel_init=kernel_init,
                layer_norm_eps=self.layer_norm_eps,
                precision=self.precision,
                fused_attention=self.fused_attention,
                outputs=len(prefix) if i == self.depth - 1 else None,
                name=f"blocks_{i}")(x, *keeps, train)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                     name="norm")(x)

    cls = x[:, 0]
    if self.has_pre_logits:
      cls = nn.tanh(
          nn.Dense(self.representation_size,
                   dtype=self.dtype,
                   kernel_init=kernel_init,
                   precision=self.precision,
                   name="pre_logits")(cls))
    if self.num_classes <= 0:
      return cls
    logits = nn.Dense(self.num_classes,
                      dtype=self.dtype,
                      kernel_init=kernel_init,
                      precision=self.precision,
                      name="head")(cls)
    if self.distilled:
      dist = nn.Dense(self.num_classes,
                      dtype=self.dtype,
                      kernel_init=kernel_init,
                      precision=self.precision,
                      name="head_dist")(x[:, 1])
      logits = (logits + dist) / 2
    return logits.astype(jnp.float32)


# size: (embed_dim, depth, num_heads)
_VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

# The (patch, resolution) pairs timm defines for each size.
_VIT_PATCH_RES = {
    "tiny": ((16, 224), (16, 384)),
    "small": ((16, 224), (16, 384), (32, 224), (32, 384)),
    "base": ((16, 224), (16, 384), (32, 224), (32, 384)),
    "large": ((16, 224), (16, 384), (32, 384)),
}


def _register_all():
  for size, (dim, depth, heads) in _VIT_SIZES.items():
    for patch, res in _VIT_PATCH_RES[size]:
      registry.register(f"vit_{size}_patch{patch}_{res}",
                        VisionTransformer,
                        embed_dim=dim,
                        depth=depth,
                        num_heads=heads,
                        patch_size=patch,
                        img_size=res)
    # ImageNet-21k checkpoints (21843 classes) with the pre-logits layer,
    # which a model with any other class count does not have.
    if size in ("base", "large"):
      for patch in (16, 32):
        registry.register(f"vit_{size}_patch{patch}_224_in21k",
                          VisionTransformer,
                          embed_dim=dim,
                          depth=depth,
                          num_heads=heads,
                          patch_size=patch,
                          img_size=224,
                          num_classes=21843,
                          representation_size=dim)
  # DeiT: ViT architecture with ImageNet mean/std; distilled variants add a
  # second token and head.
  for size, (dim, depth, heads) in _VIT_SIZES.items():
    if size == "large":
      continue
    for res in (224, 384) if size == "base" else (224,):
      common = dict(embed_dim=dim,
                    depth=depth,
                    num_heads=heads,
                    patch_size=16,
                    img_size=res,
                    mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD)
      registry.register(f"deit_{size}_patch16_{res}", VisionTransformer,
                        **common)
      registry.register(f"deit_{size}_distilled_patch16_{res}",
                        VisionTransformer,
                        distilled=True,
                        **common)
  # The reference repository's `vit_small_patch16_224` is timm's early custom
  # model, not today's ViT-S/16; it lives here under a distinct name, with
  # the ImageNet mean/std of timm 0.4's cfg for it.
  registry.register("vit_small_patch16_224_legacy",
                    VisionTransformer,
                    mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD,
                    embed_dim=768,
                    depth=8,
                    num_heads=8,
                    mlp_ratio=3.0,
                    qkv_bias=False,
                    qk_scale=768**-0.5,
                    patch_size=16,
                    img_size=224,
                    layer_norm_eps=1e-5)


_register_all()

"""Transformer families, created by timm name: `models.create(name, **kw)`."""

from vitat_jax.models import convit  # registers the ConViT names
from vitat_jax.models import swin  # registers the Swin names
from vitat_jax.models import vit  # registers the ViT / DeiT names
from vitat_jax.models.convit import ConViT
from vitat_jax.models.registry import create, create_from_config, list_models, model_defaults
from vitat_jax.models.swin import SwinTransformer
from vitat_jax.models.vit import VisionTransformer

__all__ = [
    "create", "create_from_config", "list_models", "model_defaults", "ConViT",
    "SwinTransformer", "VisionTransformer"
]

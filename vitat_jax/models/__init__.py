"""Transformer families, created by timm name: `models.create(name, **kw)`."""

from vitat_jax.models import vit  # registers the ViT / DeiT names
from vitat_jax.models.registry import create, create_from_config, list_models, model_defaults
from vitat_jax.models.vit import VisionTransformer

__all__ = ["create", "create_from_config", "list_models", "model_defaults", "VisionTransformer"]

"""vitat_jax: adversarial training of Vision Transformers in JAX.

A reimplementation of Mo et al., "When Adversarial Training Meets Vision
Transformers: Recipes from Training to Architecture" (NeurIPS 2022).

Nothing is imported here: `from vitat_jax import models, attacks` loads
what it names, and reading runs (`runs`, `report`) never imports JAX.
"""

__version__ = "0.1.0"

"""vitat_jax: adversarial training of Vision Transformers in JAX.

A reimplementation of Mo et al., "When Adversarial Training Meets Vision
Transformers: Recipes from Training to Architecture" (NeurIPS 2022).
"""

from vitat_jax import attacks
from vitat_jax import masks
from vitat_jax import models
from vitat_jax.errors import UserError

__version__ = "0.1.0"

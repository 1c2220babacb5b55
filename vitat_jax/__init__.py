"""vitat_jax: adversarial training of Vision Transformers in JAX.

A reimplementation of Mo et al., "When Adversarial Training Meets Vision
Transformers: Recipes from Training to Architecture" (NeurIPS 2022).

    run = vitat_jax.load_run("runs/x")      # a workdir's model and params
    model = vitat_jax.load_model("runs/x/export/model.safetensors")

Nothing is imported here: `from vitat_jax import models, attacks` loads
what it names, `vitat_jax.load_run` loads `vitat_jax.api` on first use, and
reading runs (`runs`, `report`) never imports JAX. The public API and what
is promised stable: docs/api.md.
"""

__version__ = "0.1.0"
# Names handed out on first use (module __getattr__, PEP 562): name -> module.
_LAZY = {"load_run": "vitat_jax.api", "load_model": "vitat_jax.api"}
__all__ = ["load_run", "load_model", "__version__"]


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'vitat_jax' has no attribute {name!r}")

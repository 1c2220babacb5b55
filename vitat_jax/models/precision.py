"""`config.matmul_precision` to a model's `precision`, per backend and dtype.

A model's `precision` is that of its float32 dots and einsums (attention,
MLP, heads); its patch embedding is always HIGHEST (`layers.PatchEmbedding`).
What each value costs and buys per backend is in docs/precision.md. "auto":

| compute dtype, use            | CPU     | GPU              | TPU             |
|-------------------------------|---------|------------------|-----------------|
| float32 training              | default | default (TF32)   | high (3 passes) |
| float32 evaluation            | highest | highest          | highest         |
| bfloat16 / float16            | default | default          | default         |

The reference trained in PyTorch 1.9 float32 on A100s, whose matmuls and
convolutions ran as TF32 (10-bit mantissa): "default" is that on a GPU, and
on a TPU "high" (bf16_3x, ~16 bits) is the cheapest setting at least as
precise (the TPU's default, one bfloat16 pass, keeps 8 bits). The CPU
computes float32 dots in float32 whatever the setting. An attack that
evaluates a model should not be weakened by rounding, so float32
evaluation is HIGHEST everywhere.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

# The values of `config.matmul_precision`.
MATMUL_PRECISIONS = ("auto", "default", "high", "highest")


def matmul_precision_for(setting: str,
                         compute_dtype,
                         *,
                         evaluation: bool = False,
                         platform: Optional[str] = None) -> Optional[str]:
  """The model `precision` for `setting` (a MATMUL_PRECISIONS value, checked
  by validate.py) at `compute_dtype` (`log_policy` says it once a run).

  None is the backend's default. Models computing in bfloat16 or float16
  always get None: the setting is about float32 dots.
  """
  platform = platform or jax.default_backend()
  if jnp.dtype(compute_dtype) != jnp.float32:
    chosen = None
  elif setting == "auto":
    if evaluation:
      chosen = "highest"
    else:
      chosen = "high" if platform == "tpu" else None
  else:
    chosen = None if setting == "default" else setting
  return chosen


def log_policy(setting: str, compute_dtype, eval_dtype=None) -> None:
  """One log line: the precision of training's and evaluation's float32
  dots on this backend (the patch embedding's is always highest)."""
  eval_dtype = eval_dtype or compute_dtype
  train = matmul_precision_for(setting, compute_dtype)
  evaluate = matmul_precision_for(setting, eval_dtype, evaluation=True)
  logging.info(
      "matmul precision on %s (matmul_precision=%s): training (%s) %s, "
      "evaluation (%s) %s, patch embedding highest", jax.default_backend(),
      setting,
      jnp.dtype(compute_dtype).name, train or "default",
      jnp.dtype(eval_dtype).name, evaluate or "default")

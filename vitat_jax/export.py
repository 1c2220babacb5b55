"""`--mode=export`: a run's model for others to evaluate (timm + a card).

    paths = export.export_run(cli_config, workdir)

Writes `<workdir>/export/model.safetensors`, a state dict that
`timm.create_model(card["timm"]["name"], **card["timm"]["kwargs"])` loads
strictly, and `<workdir>/export/model_card.json`: the architecture, the
normalisation the model expects (timm models take normalised NCHW input;
this library's take [0, 1] pixels and normalise inside), the threat model
(norm, eps), how it was trained, and the robustness results the workdir
holds: what a RobustBench model-zoo entry asks for.
"""

import time
from typing import Any, Dict

import jax

from vitat_jax import checkpointing
from vitat_jax import evaluation
from vitat_jax import model_names
from vitat_jax import pretrained
from vitat_jax import setup as setup_lib
from vitat_jax import state as state_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.pretrained import native

EXPORT_DIR = "export"
WEIGHTS = "model.safetensors"
CARD = native.CARD
# Model config fields that are not timm constructor keywords (training only).
_NOT_TIMM = ("name", "remat", "weight_init", "drop_path_rate",
             "fused_attention")


def timm_spec(config, model) -> Dict[str, Any]:
  """{"name", "kwargs"}: the timm model the export loads into."""
  kwargs = {
      k: v
      for k, v in config.model.items()
      if k not in _NOT_TIMM and v is not None
  }
  kwargs.update(img_size=int(model.img_size),
                num_classes=int(model.num_classes))
  return {"name": config.model.name, "kwargs": kwargs}


def _results(workdir: str) -> Dict[str, Any]:
  """The newest evaluation the workdir holds (robustness.json, else the
  final evaluation in metrics.json), as {attack: accuracy}, with its size."""
  for name in (workdir_lib.ROBUSTNESS_JSON, workdir_lib.METRICS_JSON):
    found = workdir_lib.read_json(workdir_lib.path(workdir, name))
    if isinstance(found, dict):
      accuracies = {
          k[:-len("_acc")]: v
          for k, v in found.items()
          if k.endswith("_acc") and isinstance(v, (int, float))
      }
      return {
          "from": name,
          "accuracy": accuracies,
          "num_eval_images": found.get("num_eval_images"),
          "eps": found.get("eps"),
          "autoattack_version": (found.get("autoattack") or {}).get("version")
      }
  return {}


def export_run(cli_config, workdir: str) -> Dict[str, str]:
  """Writes the newest checkpoint of `workdir` as timm weights plus a card;
  returns {"weights": path, "card": path}."""
  start = time.perf_counter()
  run = setup_lib.prepare(cli_config, workdir, "export")
  for name in (WEIGHTS, CARD):  # never through a link, before the restore
    workdir_lib.check_output(workdir,
                             f"{EXPORT_DIR}/{name}",
                             why="--mode=export")
  config, model = run.config, run.model
  params, source = checkpointing.restore_params(run)
  out = workdir_lib.path(workdir, EXPORT_DIR)
  weights = workdir_lib.path(out, WEIGHTS)
  card = {
      "format": "vitat_jax model card 1",
      "architecture": config.model.name,
      "variant": model_names.label(config),
      "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
      "timm": timm_spec(config, model),
      "weights": WEIGHTS,
      "checkpoint": source,
      # The params exported: their moving average ("ema") or the raw ones.
      "params": state_lib.evaluated_weights(config),
      "input": {
          "image_size": int(model.img_size),
          "layout": "NCHW for timm (this library: NHWC)",
          "range": "RGB in [0, 1], then (x - mean) / std before the model",
          "mean": [float(m) for m in model.mean],
          "std": [float(s) for s in model.std],
      },
      "num_classes": int(model.num_classes),
      "dataset": config.data.name,
      "threat_model": {
          "norm": config.eval.autoattack.norm,
          "eps": float(evaluation.eval_eps(config))
      },
      "training": {
          "method": config.method,
          "ard": bool(config.tricks.ard),
          "prm": bool(config.tricks.prm),
          "epochs": float(config.epochs),
          "attack_eps": float(config.attack.eps),
          "attack_steps": int(config.attack.steps),
          "init": config.init.source or config.init.checkpoint or "scratch",
      },
      "results": _results(workdir),
  }
  if jax.process_index() == 0:
    workdir_lib.makedirs(out)
    pretrained.export_timm(jax.device_get(params), model, weights)
    workdir_lib.write_json(workdir_lib.path(out, CARD), card, indent=2)
  return {
      "weights": weights,
      "card": workdir_lib.path(out, CARD),
      "wall_time_s": time.perf_counter() - start
  }

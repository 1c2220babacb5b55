"""Checks of a whole config before any data loading or compilation.

Each failure is a `UserError` with one line saying what is wrong and what to
do. Checks that need the data (image sizes of a folder, class counts) run
right after loading, still before anything is compiled.
"""

import json
import os

from vitat_jax import evaluation
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax.data import randaugment
from vitat_jax.errors import UserError

DATASETS = ("digits", "image_folder", "tfds")


def _check_data(config):
  data = config.data
  if data.name not in DATASETS:
    raise UserError(f"unknown dataset {data.name!r}: use one of "
                    f"{', '.join(DATASETS)}")
  if data.name == "image_folder":
    if not data.root:
      raise UserError("data.root is empty: set --config.data.root=DIR, a "
                      "folder holding train/<class>/*.jpg and test/<class>/")
    if not os.path.isdir(data.root):
      raise UserError(f"data directory {data.root!r} does not exist: set "
                      "--config.data.root to a folder with train/ and test/")


def _check_model(config):
  """Names, keywords and divisibility, checked by building the module."""
  image_size = config.model.get("img_size") or config.data.image_size
  if image_size:
    models.create_from_config(config.model, img_size=image_size)
  else:  # the size comes from the data: check what can be checked now
    models.model_defaults(config.model.name)


def check_config(config):
  """Raises UserError for the first problem found in `config`."""
  if config.epochs <= 0:
    raise UserError(f"epochs={config.epochs} must be positive")
  if config.batch_size <= 0 or config.eval.batch_size <= 0:
    raise UserError("batch_size and eval.batch_size must be positive")
  if (config.ard or config.prm) and not (
      0 <= config.warmup_epochs <= config.epochs):
    raise UserError(f"warmup_epochs={config.warmup_epochs} must be in [0, "
                    f"epochs={config.epochs}]: ARD/PRM warm up within the run")
  if not 0 <= config.drop_rate <= 1:
    raise UserError(f"drop_rate={config.drop_rate} must be in [0, 1] (the "
                    "ARD keep probability reached after warm-up)")
  accum_steps = config.get("accum_steps", 1)
  if (not isinstance(accum_steps, int) or accum_steps < 1
      or config.batch_size % accum_steps):
    raise UserError(f"accum_steps={accum_steps} must be a positive integer "
                    f"dividing batch_size={config.batch_size}")
  fsdp_min_size = config.get("fsdp_min_size", 1)
  if not isinstance(fsdp_min_size, int) or fsdp_min_size < 1:
    raise UserError(f"fsdp_min_size={fsdp_min_size} must be a positive "
                    "integer (leaves with fewer elements stay replicated)")
  if config.beta < 0:
    raise UserError(f"beta={config.beta} must be >= 0 (the TRADES / MART "
                    "trade-off; the paper uses 6)")
  randaugment.check_spec(config.augment.get("randaugment", ""))
  if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise UserError("log_every_steps and checkpoint_every_steps must be "
                    "positive")
  mix = config.mixup
  if not (0 <= mix.prob <= 1 and 0 <= mix.switch_prob <= 1
          and mix.mixup_alpha >= 0 and mix.cutmix_alpha >= 0
          and 0 <= mix.label_smoothing < 1):
    raise UserError("mixup.prob and mixup.switch_prob must be in [0, 1], the "
                    "alphas >= 0 and label_smoothing in [0, 1)")
  objectives.check_config(config)
  optim.check_config(config.optim)
  for name in list(config.eval.attacks) + list(config.eval.epoch_attacks):
    evaluation.parse_attack(name)
  evaluation.check_autoattack_config(config)
  if config.method != "natural" or any(
      n != "clean" for n in config.eval.attacks):
    eval_eps = config.eval.eps or config.attack.eps
    if not 0 < eval_eps <= 1:
      raise UserError(f"eval.eps={eval_eps} must be in (0, 1] (pixel units)")
    if not 0 < config.eval.alpha <= eval_eps:
      raise UserError(f"eval.alpha={config.eval.alpha} must be in (0, "
                      f"eps={eval_eps}]: the step cannot exceed the radius")
  _check_data(config)
  _check_model(config)
  if config.init.checkpoint and not os.path.isfile(config.init.checkpoint):
    raise UserError(f"checkpoint {config.init.checkpoint!r} does not exist: "
                    "fix --config.init.checkpoint or leave it empty to train "
                    "from scratch")


# Sections that may change between a run and its resumption.
_RESUMABLE_KEYS = ("eval", "log_every_steps", "checkpoint_every_steps",
                   "keep_checkpoints")


def _run_defining(config_dict):
  return {k: v for k, v in config_dict.items() if k not in _RESUMABLE_KEYS}


def check_workdir_config(config, workdir: str):
  """Refuses a workdir holding a run with a different config (no writes)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  current = json.loads(config.to_json_best_effort())
  with open(path) as f:
    previous = json.load(f)
  old, new = _run_defining(previous), _run_defining(current)
  if old != new:
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k))
    raise UserError(
        f"workdir {workdir!r} holds a run with a different config "
        f"(differs in: {', '.join(changed)}); use a new --workdir or pass "
        "--overwrite to start over")


def write_workdir_config(config, workdir: str):
  """Writes the resolved config as workdir/config.json."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2,
              sort_keys=True)

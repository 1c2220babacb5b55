"""Checks of a whole config before any data loading or compilation.

Each failure is a `UserError` with one line saying what is wrong and what to
do. Checks that need the data (image sizes of a folder, class counts) run
right after loading, still before anything is compiled.
"""

import math
import os

from vitat_jax import evaluation
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax.attack_names import parse_attack
from vitat_jax.checkpoints.io import FORMATS
from vitat_jax.data import randaugment
from vitat_jax.errors import UserError
from vitat_jax.models import precision

DATASETS = ("digits", "image_folder", "tfds")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")


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


def _finite(name,
            value,
            *,
            low=None,
            high=None,
            low_open=False,
            high_open=False,
            hint=""):
  """`value` a finite number within the given bounds, else a one-line error."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    span = ("" if low is None and high is None else
            f"in {lo}{hi}" if low is not None and high is not None else
            f"{'>' if low_open else '>='} {low}"
            if low is not None else f"{'<' if high_open else '<='} {high}")
    raise UserError(f"{name}={value} must be a finite number {span}"
                    f"{hint}")


def _integer(name, value, low, hint=""):
  if (not isinstance(value, int) or isinstance(value, bool) or value < low):
    raise UserError(f"{name}={value} must be an integer >= {low}{hint}")


def _check_run(config):
  _integer("seed", config.seed, 0, " (the run's random seed)")
  if config.seed >= 2**32:
    raise UserError(f"seed={config.seed} must be below 2**32")
  if not (math.isfinite(config.epochs) and config.epochs > 0):
    raise UserError(f"epochs={config.epochs} must be a positive finite "
                    "number")
  if config.batch_size <= 0 or config.eval.batch_size <= 0:
    raise UserError("batch_size and eval.batch_size must be positive")
  _finite("tricks.warmup_epochs", config.tricks.warmup_epochs, low=0)
  _integer("tricks.prm_patch_size", config.tricks.prm_patch_size, 1,
           " (PRM's cell size in pixels)")
  if (config.tricks.ard or config.tricks.prm
     ) and not (0 <= config.tricks.warmup_epochs <= config.epochs):
    raise UserError(
        f"tricks.warmup_epochs={config.tricks.warmup_epochs} must be in [0, "
        f"epochs={config.epochs}]: ARD/PRM warm up within the run")
  if not (isinstance(config.tricks.final_keep_rate,
                     (int, float)) and 0 <= config.tricks.final_keep_rate <= 1):
    raise UserError(
        f"tricks.final_keep_rate={config.tricks.final_keep_rate} must be in [0, 1] (the "
        "ARD keep probability reached after warm-up)")
  accum_steps = config.accum_steps
  if (not isinstance(accum_steps, int) or accum_steps < 1 or
      config.batch_size % accum_steps):
    raise UserError(f"accum_steps={accum_steps} must be a positive integer "
                    f"dividing batch_size={config.batch_size}")
  if not isinstance(config.fsdp_min_size, int) or config.fsdp_min_size < 1:
    raise UserError(f"fsdp_min_size={config.fsdp_min_size} must be a positive"
                    " integer (leaves with fewer elements stay replicated)")
  _integer("num_devices", config.num_devices, 0, " (0 = every device)")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise UserError(f"compute_dtype={config.compute_dtype!r}: use float32, "
                    "bfloat16 (GPU/TPU), float16 or auto (bfloat16 on "
                    "GPU/TPU, float32 on CPU)")
  if config.matmul_precision not in precision.MATMUL_PRECISIONS:
    raise UserError(f"matmul_precision={config.matmul_precision!r}: use "
                    f"{', '.join(precision.MATMUL_PRECISIONS)} "
                    "(docs/precision.md)")
  _finite("beta",
          config.beta,
          low=0,
          hint=" (the TRADES / MART trade-off; the paper uses 6)")
  if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise UserError("log_every_steps and checkpoint_every_steps must be "
                    "positive")
  if not isinstance(config.compilation_cache_dir, str):
    raise UserError(f"compilation_cache_dir={config.compilation_cache_dir!r}"
                    " must be a directory path, or '' to turn the cache off")
  _finite("checkpoint_every_minutes",
          config.checkpoint_every_minutes,
          low=0,
          hint=" (0 = checkpoints by steps only)")
  if (not isinstance(config.checkpoint_every_epochs, int) or
      config.checkpoint_every_epochs < 0):
    raise UserError(f"checkpoint_every_epochs="
                    f"{config.checkpoint_every_epochs!r} must be an integer "
                    ">= 0 (0 = no checkpoints at epoch ends)")
  if config.keep_checkpoints < 1:
    raise UserError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1"
                    " (the checkpoints a run keeps; 0 would delete them all)")


def _check_augment(config):
  aug = config.augment
  _integer("augment.crop_padding", aug.crop_padding, 0, " (0 turns the "
           "random crop off)")
  randaugment.check_spec(aug.randaugment)
  mix = config.mixup
  for name in ("prob", "switch_prob", "mixup_alpha", "cutmix_alpha",
               "label_smoothing"):
    _finite(f"mixup.{name}", mix[name])
  if not (0 <= mix.prob <= 1 and 0 <= mix.switch_prob <= 1 and mix.mixup_alpha
          >= 0 and mix.cutmix_alpha >= 0 and 0 <= mix.label_smoothing < 1):
    raise UserError("mixup.prob and mixup.switch_prob must be in [0, 1], the "
                    "alphas >= 0 and label_smoothing in [0, 1)")


def _check_optim(config):
  opt = config.optim
  for name in ("lr", "momentum", "weight_decay", "grad_clip", "warmup_epochs",
               "b1", "b2"):
    _finite(f"optim.{name}", opt[name])
  if not isinstance(opt.nesterov, bool):
    raise UserError(f"optim.nesterov={opt.nesterov!r} must be True or False")
  optim.check_config(opt)
  _finite("optim.momentum", opt.momentum, low=0, high=1, high_open=True)
  if not 0 <= opt.warmup_epochs <= config.epochs:
    raise UserError(f"optim.warmup_epochs={opt.warmup_epochs} must be in "
                    f"[0, epochs={config.epochs}]")


def _check_eval(config):
  ev = config.eval
  if ev.eps is not None:
    _finite("eval.eps",
            ev.eps,
            low=0,
            high=1,
            low_open=True,
            hint=" (pixel units); leave it unset to use attack.eps")
  if ev.compute_dtype not in ("",) + COMPUTE_DTYPES:
    raise UserError(f"eval.compute_dtype={ev.compute_dtype!r}: use '' (the "
                    "run's compute_dtype), float32, bfloat16 or float16")
  _finite("eval.alpha", ev.alpha)
  _integer("eval.restarts", ev.restarts, 1, " (random starts per attack)")
  _integer("eval.num_examples", ev.num_examples, 0, " (0 = the whole test set)")
  _integer("eval.epoch_num_examples", ev.epoch_num_examples, 0,
           " (0 = no evaluation after each epoch)")
  if not ev.attacks:
    raise UserError("eval.attacks is empty: list at least one, e.g. "
                    "--config.eval.attacks=\"('clean','pgd20')\"")
  if ev.epoch_num_examples and not ev.epoch_attacks:
    raise UserError("eval.epoch_attacks is empty: list at least one, or set "
                    "eval.epoch_num_examples=0 to skip the epoch evaluation")
  for name in list(ev.attacks) + list(ev.epoch_attacks):
    parse_attack(name)
  evaluation.check_autoattack_config(config)
  if config.method != "natural" or any(n != "clean" for n in ev.attacks):
    eval_eps = ev.eps or config.attack.eps
    if not 0 < eval_eps <= 1:
      raise UserError(f"eval.eps={eval_eps} must be in (0, 1] (pixel units)")
    if not 0 < ev.alpha <= eval_eps:
      raise UserError(f"eval.alpha={ev.alpha} must be in (0, "
                      f"eps={eval_eps}]: the step cannot exceed the radius")


def _check_init(config):
  init = config.init
  if init.format not in ("auto",) + FORMATS:
    raise UserError(f"unknown init.format {init.format!r}: use auto, "
                    f"{', '.join(FORMATS)}")
  path = init.checkpoint
  if path and os.path.isdir(path):
    raise UserError(f"checkpoint {path!r} is a directory: pass the weights "
                    "file in it (.safetensors, .pth or .npz) as "
                    "--config.init.checkpoint")
  if path and not os.path.isfile(path):
    if init.source:  # a paper config's pre-trained weights
      name = os.path.splitext(os.path.basename(path))[0]
      raise UserError(
          f"pre-trained weights {path!r} not found: save {init.source} there "
          f"(python scripts/save_pretrained.py "
          f"--dir={os.path.dirname(path) or '.'} {name}), or pass "
          "pretrained=scratch to train from random weights")
    raise UserError(f"checkpoint {path!r} does not exist: fix "
                    "--config.init.checkpoint or leave it empty to train "
                    "from scratch")


def _check_model_fields(config):
  m = config.model
  for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
               "depths"):
    value = m.get(name)
    if isinstance(value, (tuple, list)) and value:  # Swin: one per stage
      for v in value:
        _integer(f"model.{name}", v, 1, " (each stage's)")
    elif value is not None:
      _integer(f"model.{name}", value, 1)
  if m.get("mlp_ratio") is not None:
    _finite("model.mlp_ratio", m.mlp_ratio, low=0, low_open=True)
  if m.get("drop_path_rate") is not None:
    _finite("model.drop_path_rate",
            m.drop_path_rate,
            low=0,
            high=1,
            high_open=True,
            hint=" (the stochastic depth of the last block)")


def _check_data_fields(config):
  data = config.data
  _integer("data.image_size", data.image_size, 0,
           " (0 = the data set's own size)")
  for name in ("train_examples", "test_examples"):
    _integer(f"data.{name}", data[name], 0, " (0 = all)")
  _integer("data.subset_seed", data.subset_seed, 0)
  if data.name == "tfds" and not data.tfds_name:
    raise UserError("data.tfds_name is empty: name a TFDS data set, e.g. "
                    "--config.data.tfds_name=cifar10")
  for name in ("mean", "std"):
    values = tuple(data[name])
    if values and (len(values) != 3 or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
      raise UserError(f"data.{name}={values} must be () (the data set's) or "
                      "3 finite numbers, one per RGB channel")
  if any(v <= 0 for v in data.std):
    raise UserError(f"data.std={tuple(data.std)} must be positive")
  if data.cache_dir and os.path.exists(
      data.cache_dir) and not os.path.isdir(data.cache_dir):
    raise UserError(f"data.cache_dir {data.cache_dir!r} is a file: pass a "
                    "directory or leave it empty")


def check_config(config):
  """Raises UserError for the first problem found in `config`.

  Every field of configs/default.py is checked here, before anything is
  loaded, compiled or written.
  """
  _check_run(config)
  _check_augment(config)
  objectives.check_config(config)
  _check_optim(config)
  _check_eval(config)
  _check_init(config)
  _check_data(config)
  _check_data_fields(config)
  _check_model_fields(config)
  _check_model(config)
  if config.tricks.prm:
    objectives.check_prm_patch_size(
        config.tricks.prm_patch_size,
        config.model.get("img_size") or config.data.image_size)


def check_steps(config, steps_per_epoch: int) -> int:
  """The run's total steps; a one-line error if they round to zero."""
  total = optim.epochs_to_steps(config.epochs, steps_per_epoch)
  if total <= 0:
    raise UserError(f"epochs={config.epochs} of {steps_per_epoch} steps each "
                    "round to 0 training steps: raise epochs, or lower "
                    "batch_size")
  return total

"""Every rule of a config, checked before any data loading or compilation.

One owner per rule. `check_config` runs the sections in this order, and no
rule below is written anywhere else; the factories that build from a
section (optim.make_optimizer, objectives.make_objective, the Evaluator,
checkpointing) trust it:

| section | checked by |
|---|---|
| run fields (seed, epochs, batch sizes, tricks, checkpoints, dtypes) | `_check_run` |
| `augment`, `mixup` | `_check_augment` (RandAugment spec: `randaugment.check_spec`) |
| `method`, `attack` | `_check_method` (names: `objectives.methods()`, `objectives.TRAINING_ATTACKS`; budget: `attacks.check_budget`) |
| `ema`, `eval.weights` | `_check_ema` |
| `optim` | `check_optim` (parameter groups: `_check_param_groups`) |
| `eval` (attacks, each once, eps, AutoAttack) | `_check_eval` (`eval.protocol`: `data.protocol.check_fields`) |
| `init` | `_check_init` |
| `init.resample`, `eval.resize_to_model` against an external checkpoint's own image size and class count (read from its shapes or card) | `native_eval._refuse_other_size`, `native_eval._check_head_classes` (`--mode=eval` only) |
| `data` | `data.check_config`, which `data.load` also runs (a library function taking any attribute object); `data.extra` and `extra_fraction` through `data.extra`, whose rows per batch against the devices `data.extra_rows` checks in `setup.prepare` |
| `model` | `_check_model_fields`, then building the module (`models.create_from_config`) |
| `eval` against the data's class count (AutoAttack's targeted and DLR attacks) | `check_classes`, run by `setup.prepare` right after the data is listed |

Each failure is a `UserError` with one line saying what is wrong and what to
do. What needs the data (an image folder's size, the class count, the PRM
cells of a size that comes from the data) is checked by the same functions
right after loading, in `setup.prepare`, still before anything is compiled.
"""

import math
import os
import re
from typing import Optional

from vitat_jax import attacks
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import param_groups
from vitat_jax.attack_names import parse_attack
from vitat_jax.attacks.autoattack import min_classes
from vitat_jax.attacks.autoattack import too_few_classes
from vitat_jax.pretrained.io import FORMATS
from vitat_jax import data
from vitat_jax.data import protocol
from vitat_jax.data import randaugment
from vitat_jax.errors import UserError
from vitat_jax.models import precision

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")


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
  _finite("device_memory_gb",
          config.device_memory_gb,
          low=0,
          hint=" (GiB per device; 0 = the backend's limit)")
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


def _check_ema(config):
  _finite("ema.decay",
          config.ema.decay,
          low=0,
          high=1,
          high_open=True,
          hint=" (0 = no weight averaging; e.g. 0.9998 as ARES)")
  if not isinstance(config.ema.warmup, bool):
    raise UserError(f"ema.warmup={config.ema.warmup!r} must be True or False")
  weights = config.eval.weights
  if weights not in ("auto", "ema", "raw"):
    raise UserError(f"eval.weights={weights!r}: use auto (the EMA params "
                    "when the run keeps them), ema or raw")
  if weights == "ema" and not config.ema.decay > 0:
    raise UserError("eval.weights='ema' but this run keeps no EMA params "
                    "(ema.decay=0): use eval.weights=raw, or train with "
                    "--config.ema.decay=0.999")


def _check_method(config, training):
  # Evaluating or exporting builds no objective: a run trained with a
  # registered one is evaluated without registering it again.
  if training and config.method not in objectives.methods():
    raise UserError(f"unknown method {config.method!r}: use one of "
                    f"{', '.join(objectives.methods())} (or register yours "
                    "with vitat_jax.objectives.register before training)")
  if config.attack.name not in objectives.TRAINING_ATTACKS:
    raise UserError(f"unknown attack.name {config.attack.name!r}: use one of "
                    f"{', '.join(objectives.TRAINING_ATTACKS)}")
  if config.method != "natural":
    attacks.check_budget(config.attack.eps, config.attack.alpha,
                         config.attack.steps)
  _finite("attack.eps_warmup_epochs",
          config.attack.eps_warmup_epochs,
          low=0,
          high=config.epochs,
          hint=" (0 = no epsilon warm-up; within the run)")
  _finite("attack.eps_warmup_floor",
          config.attack.eps_warmup_floor,
          low=0,
          high=1,
          hint=" (the fraction of attack.eps at step 0)")


def check_optim(opt, epochs: float, model_name: Optional[str] = None) -> None:
  """The `optim` section (the factories in optim.py trust it); with
  `model_name`, also that its family supports `optim.layer_decay`."""
  for name in ("lr", "weight_decay", "grad_clip", "warmup_epochs", "b1", "b2"):
    _finite(f"optim.{name}", opt[name])
  if not isinstance(opt.nesterov, bool):
    raise UserError(f"optim.nesterov={opt.nesterov!r} must be True or False")
  if opt.name not in optim.OPTIMIZERS:
    raise UserError(f"unknown optimizer {opt.name!r}: use one of "
                    f"{', '.join(optim.OPTIMIZERS)}")
  if opt.schedule not in optim.SCHEDULES:
    raise UserError(f"unknown lr schedule {opt.schedule!r}: use one of "
                    f"{', '.join(optim.SCHEDULES)}")
  if opt.lr <= 0:
    raise UserError(f"optim.lr={opt.lr} must be positive")
  if opt.grad_clip < 0 or opt.weight_decay < 0:
    raise UserError("optim.grad_clip and optim.weight_decay must be >= 0 "
                    "(0 turns them off)")
  _check_milestones(opt)
  if opt.momentum is not None:  # None: the model family's (optim.py)
    _finite("optim.momentum", opt.momentum, low=0, high=1, high_open=True)
  if not 0 <= opt.warmup_epochs <= epochs:
    raise UserError(f"optim.warmup_epochs={opt.warmup_epochs} must be in "
                    f"[0, epochs={epochs}]")
  _check_param_groups(opt, model_name)


def _check_param_groups(opt, model_name):
  if opt.no_decay not in param_groups.NO_DECAY_MODES:
    raise UserError(f"unknown optim.no_decay={opt.no_decay!r}: use auto (no "
                    "decay on biases, norms, tokens, position tables), none "
                    "(decay every param) or '' (the optimizer's default)")
  extra = opt.no_decay_extra
  if isinstance(extra, str) or not isinstance(extra, (tuple, list)):
    raise UserError(f"optim.no_decay_extra={extra!r} must be a tuple of "
                    "regular expressions, e.g. ('head',)")
  for pattern in extra:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise UserError(f"optim.no_decay_extra: {pattern!r} is not a regular "
                      f"expression ({e}); write e.g. ('head',)") from None
  _finite("optim.layer_decay",
          opt.layer_decay,
          low=0,
          high=1,
          hint=" (0 or 1 = off; 0.65-0.75 are usual)")
  if (param_groups.layer_decay_on(opt.layer_decay) and model_name and
      not param_groups.supports_layer_decay(model_name)):
    families = ", ".join(f.__name__ for f in param_groups.LAYER_DECAY_FAMILIES)
    raise UserError(f"optim.layer_decay={opt.layer_decay} is not supported "
                    f"for model {model_name!r} (only {families}): set "
                    "optim.layer_decay=0")


def _check_milestones(opt):
  if opt.milestones_from not in optim.MILESTONES_FROM:
    raise UserError(f"optim.milestones_from={opt.milestones_from!r}: use "
                    "'end' (epochs before the end of the run) or 'start' "
                    "(absolute epochs)")
  milestones = tuple(opt.milestones)
  for value in milestones:
    _finite("optim.milestones", value, low=0, low_open=True)
  # Drops in time order: from the end the counts shrink, from the start
  # the epochs grow.
  step = -1 if opt.milestones_from == "end" else 1
  if any((b - a) * step <= 0 for a, b in zip(milestones, milestones[1:])):
    order = "decreasing" if step < 0 else "increasing"
    raise UserError(f"optim.milestones={milestones} counted from the "
                    f"{opt.milestones_from} must be strictly {order}, e.g. "
                    f"{(5, 2) if step < 0 else (36, 38)}")


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
  for field in ("attacks", "epoch_attacks"):
    names = list(ev[field])
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
      raise UserError(f"eval.{field} lists {twice[0]!r} twice: list each "
                      "attack once")
  protocol.check_fields(config)
  if config.method != "natural" or any(n != "clean" for n in ev.attacks):
    eval_eps = ev.eps or config.attack.eps
    if not 0 < eval_eps <= 1:
      raise UserError(f"eval.eps={eval_eps} must be in (0, 1] (pixel units: "
                      f"8/255 is {8 / 255:.4f})")
    if not 0 < ev.alpha <= eval_eps:
      raise UserError(f"eval.alpha={ev.alpha} must be in (0, "
                      f"eps={eval_eps}]: the step cannot exceed the radius")
  _check_autoattack(config)


def _check_autoattack(config):
  aa, ev = config.eval.autoattack, config.eval
  if not any(parse_attack(n).kind == "autoattack" for n in ev.attacks):
    return
  custom = tuple(aa.attacks)
  version = "custom" if custom else aa.version
  if custom and aa.version not in ("standard", "custom"):
    raise UserError(f"eval.autoattack.attacks={list(custom)} is a custom "
                    f"list; it cannot be combined with version="
                    f"{aa.version!r} (leave the version at 'standard')")
  attacks.attack_settings(version, ev.eps or config.attack.eps, aa.norm,
                          custom or None)
  if aa.batch_size < 0:
    raise UserError(f"eval.autoattack.batch_size={aa.batch_size} must be >= "
                    "0 (0: eval.batch_size)")


def _check_init(config):
  init = config.init
  if init.format not in ("auto",) + FORMATS:
    raise UserError(f"unknown init.format {init.format!r}: use auto, "
                    f"{', '.join(FORMATS)}")
  if init.get("resample") and config.eval.get("resize_to_model"):
    raise UserError("init.resample=True resamples the checkpoint to the data "
                    "and eval.resize_to_model=True resizes the data to the "
                    "checkpoint: set one of them")
  path = init.checkpoint
  if path and os.path.isdir(path):
    raise UserError(f"checkpoint {path!r} is a directory: pass the weights "
                    "file in it (.safetensors, .pth or .npz) as "
                    "--config.init.checkpoint")
  if path and os.path.exists(path) and not os.path.isfile(path):
    raise UserError(f"checkpoint {path!r} is not a regular file (a device, "
                    "pipe or socket): pass a weights file as "
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


def check_config(config, *, training=True):
  """Raises UserError for the first problem found in `config`.

  Every field of configs/default.py is checked here, before anything is
  loaded, compiled or written. `training=False` (evaluation, export) lets
  `method` name an objective this process has not registered, and leaves
  `data.extra`'s files unread (only training reads them).
  """
  # The model's name first: a misspelt `:model=` would otherwise be
  # reported as its pre-trained file missing (`_check_init`).
  models.model_defaults(config.model.name)
  _check_run(config)
  _check_augment(config)
  _check_method(config, training)
  _check_ema(config)
  check_optim(config.optim, config.epochs, config.model.name)
  _check_eval(config)
  _check_init(config)
  data.check_config(config.data, with_extra=training)
  _check_model_fields(config)
  _check_model(config)
  if config.tricks.prm:
    objectives.check_prm_patch_size(
        config.tricks.prm_patch_size,
        config.model.get("img_size") or config.data.image_size)


def check_classes(config, num_classes: int) -> None:
  """AutoAttack's attacks against the data's class count (targeted ones
  need n_target_classes + 1 classes, DLR 4), known once the data is listed:
  before any training or compilation."""
  aa, ev = config.eval.autoattack, config.eval
  if not any(
      parse_attack(n).kind == "autoattack"
      for n in list(ev.attacks) + list(ev.epoch_attacks)):
    return
  custom = tuple(aa.attacks)
  settings = attacks.attack_settings("custom" if custom else aa.version,
                                     ev.eps or config.attack.eps, aa.norm,
                                     custom or None)
  if num_classes < min_classes(settings):
    raise too_few_classes(num_classes, settings)


def check_steps(config, steps_per_epoch: int) -> int:
  """The run's total steps; a one-line error if they round to zero."""
  total = optim.epochs_to_steps(config.epochs, steps_per_epoch)
  if total <= 0:
    raise UserError(f"epochs={config.epochs} of {steps_per_epoch} steps each "
                    "round to 0 training steps: raise epochs, or lower "
                    "batch_size")
  return total

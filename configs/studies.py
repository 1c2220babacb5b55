"""The paper's studies of the adversarial-training recipe, one arm per run.

Each study varies one thing of the CIFAR-10 AT recipe (configs/cifar10.py:
DeiT-Ti, ImageNet-1k pre-trained, SGD piecewise, clipping 1.0, 40 epochs,
Mixup/CutMix, PGD-10) and keeps the rest:

    python main.py --workdir=runs/study_pretraining_in21k \
      --config=configs/studies.py:study=pretraining,arm=in21k,pretrained_dir=pretrained
    python scripts/sweep.py --study=pretraining --base_workdir=runs/studies

  study         arms (first = the paper's recipe where it is one)
  pretraining   in1k, in21k, scratch (ViT-B/16, which has both ImageNet
                variants): the paper finds pre-training necessary
  clip          on, off (global-norm clipping 1.0 or none)
  epochs        40, 80: the paper finds more epochs do not help
  augmentation  mixup_cutmix (the reference's), none, mixup, cutmix,
                randaugment (rand-m9-mstd0.5, timm's): the paper finds
                Mixup/CutMix help a little and RandAugment hurts
  optimizer     sgd_piecewise, adamw_cyclic (AdamW lr 5e-4, weight decay
                0.05, one-cycle; our choice of its hyper-parameters): the
                paper finds SGD necessary
  ard_prm       none, ard, prm, ard_prm: the ablation of the two tricks
  n_w           2, 5, 10, 20 (warm-up epochs of ARD+PRM, both on)

Other keys pass through to configs/cifar10.py (model, method, source, root,
pretrained_dir, ...). The numbers are in the paper's tables for each study;
the reference's README states none. docs/recipes.md lists every command.
"""

from configs import cifar10
from configs import common

STUDIES = {
    "pretraining": ("in1k", "in21k", "scratch"),
    "clip": ("on", "off"),
    "epochs": ("40", "80"),
    "augmentation": ("mixup_cutmix", "none", "mixup", "cutmix", "randaugment"),
    "optimizer": ("sgd_piecewise", "adamw_cyclic"),
    "ard_prm": ("none", "ard", "prm", "ard_prm"),
    "n_w": ("2", "5", "10", "20"),
}

# The `:key=value,...` arguments, as --help and --mode=config list them.
ARGS = {
    "study": f"required: {' | '.join(STUDIES)}",
    "arm": "one of the study's arms (default: its first)",
    **cifar10.ARGS
}


def study_args(study):
  """The `:arg` strings of every arm of `study` (for scripts/sweep.py)."""
  return [f"study={study},arm={arm}" for arm in STUDIES[study]]


def _split(arg):
  study_keys, rest = {}, []
  for item in filter(None, (arg or "").split(",")):
    key = item.partition("=")[0].strip()
    if key in ("study", "arm"):
      study_keys.update(common.parse_arg(item, ("study", "arm")))
    else:
      rest.append(item)
  return study_keys, ",".join(rest)


def get_config(arg=None):
  keys, rest = _split(arg)
  study = keys.get("study")
  if study not in STUDIES:
    raise ValueError(f"study={study!r}: use one of {', '.join(STUDIES)}")
  arm = keys.get("arm", STUDIES[study][0])
  if arm not in STUDIES[study]:
    raise ValueError(f"arm={arm!r} of study {study}: use one of "
                     f"{', '.join(STUDIES[study])}")
  base = cifar10.parse_arg(rest)
  base.setdefault("pretrained", "in1k")
  if study == "pretraining":
    base.setdefault("model", "vit_base_patch16_224")
    base["pretrained"] = arm
  config = cifar10.config_from_args(base)
  if study == "clip":
    config.optim.grad_clip = 1.0 if arm == "on" else 0.0
  elif study == "epochs":
    config.epochs = float(arm)
  elif study == "augmentation":
    mix = config.mixup
    if arm in ("none", "randaugment"):
      mix.prob = 0.0
    elif arm == "mixup":
      mix.cutmix_alpha = 0.0
    elif arm == "cutmix":
      mix.mixup_alpha = 0.0
    if arm == "randaugment":
      config.augment.randaugment = "rand-m9-mstd0.5"
  elif study == "optimizer" and arm == "adamw_cyclic":
    config.optim.name = "adamw"
    config.optim.schedule = "cyclic"
    config.optim.lr = 5e-4
    config.optim.weight_decay = 0.05
  elif study == "ard_prm":
    config.tricks.ard = arm in ("ard", "ard_prm")
    config.tricks.prm = arm in ("prm", "ard_prm")
  elif study == "n_w":
    config.tricks.ard = config.tricks.prm = True
    config.tricks.warmup_epochs = float(arm)
  return config

"""CIFAR-10 with the paper's recipe (Mo et al. 2022; the reference's
train_cifar.py defaults).

32x32 input with patch 4 (an 8x8 grid; PRM masks the same 8x8 grid of 4-px
cells; a Swin, this project's extension, gets patch 2 and window 4), PGD-10 training attack at eps 8/255, step 2/255; SGD lr 0.1,
momentum 0.9, weight decay 1e-4, global-norm clipping 1.0, batch 64, 40
epochs with the lr divided by 10 at epochs 35 and 38 (the reference code's
E - 5 and E - 2: `optim.milestones=(5, 2)` counted from the end, so a
shorter run moves them, and a run of 5 epochs or less never trains at
optim.lr, with a warning; the paper's text says 36 and 38:
`--config.optim.milestones_from=start --config.optim.milestones="(36, 38)"`,
see docs/reference_differences.md); Mixup/CutMix (prob
0.3) on AT batches; ARD/PRM warm-up over n_w = 10 epochs; initialised from
the model's ImageNet weights (as the reference, whose default is
pre-trained; `pretrained=scratch` turns it off); final evaluation with CW-20,
PGD-20, PGD-100 and AutoAttack (standard) on the test set.

The reference's runs (its run_cifar.sh), here, with the weights saved once in
`pretrained/` (`python scripts/save_pretrained.py --dir=pretrained
deit_tiny_patch16_224`; configs/common.REFERENCE_WEIGHTS names the timm tag
of each model):

    python main.py --workdir=runs/deit_t_at --config=configs/cifar10.py:\
model=deit_tiny_patch16_224,method=at
    python main.py --workdir=runs/deit_t_at_ardprm --config=configs/cifar10.py:\
model=deit_tiny_patch16_224,method=at,ard_prm=True

(`method=trades` / `mart` for the other rows). The paper reports clean,
PGD-20, CW-20 and AutoAttack accuracy of every model and method with and
without ARD+PRM: see the paper's CIFAR-10 results tables (the README of the
reference gives no numbers; ARD+PRM add about +1% robust accuracy).

Arguments (`:key=value,...`):
  model       one of the paper's models (configs/common.PAPER_MODELS) or any
              registered name. The reference's `vit_small_patch16_224` is
              `vit_small_patch16_224_legacy` here; the plain name is timm's
              current ViT-S. The reference trains Swin on Imagenette only
              (configs/imagenette.py); a 32-px Swin here is this project's
              own extension.
  method      at | trades | mart | natural
  ard, prm    True/False; `ard_prm=True` sets both
  pretrained  in1k (default, the reference's) | in21k | scratch: ImageNet
              weights read from `pretrained_dir` (default "pretrained"); a
              missing file is a one-line error naming the path and the
              timm tag to save there
  source      tfds (default; tfds.data_source("cifar10")) | folder
  root        with source=folder: root/{train,test}/<class>/*.jpg
"""

from configs import common
from configs import default

# The `:key=value,...` arguments, as --help and --mode=config list them.
ARGS = {
    "model": "a paper model (configs/common.PAPER_MODELS) or any registered "
             "name (default deit_tiny_patch16_224)",
    "method": "at (default) | trades | mart | natural",
    "ard": "True/False: attention random dropping",
    "prm": "True/False: perturbation random masking",
    "ard_prm": "True sets both ard and prm",
    "source": "tfds (default) | folder",
    "root": "with source=folder: root/{train,test}/<class>/*.jpg",
    "pretrained": "in1k (default) | in21k | scratch",
    "pretrained_dir": "where the ImageNet weights are (default pretrained)",
}
_KEYS = tuple(ARGS)
_BOOL_KEYS = ("ard", "prm", "ard_prm")


def parse_arg(arg):
  return common.parse_arg(arg, _KEYS, _BOOL_KEYS)


def apply_args(config, args):
  """The `:arg` choices shared by the CIFAR-10 and Imagenette configs."""
  if "model" in args:
    config.model.name = args["model"]
  config.method = args.get("method", config.method)
  both = args.get("ard_prm", False)
  config.tricks.ard = args.get("ard", both)
  config.tricks.prm = args.get("prm", both)
  return common.apply_pretrained(config, args.get("pretrained", "in1k"),
                                 args.get("pretrained_dir", "pretrained"))


def get_config(arg=None):
  return config_from_args(parse_arg(arg))


def config_from_args(args):
  """The config of parsed `:arg` values (a dict, as `parse_arg` returns)."""
  config = default.get_config()
  config.model.name = "deit_tiny_patch16_224"
  config.model.patch_size = 4
  config.method = "at"
  apply_args(config, args)
  source = args.get("source", "tfds")
  if source == "folder":
    config.data.name = "image_folder"
    config.data.root = args.get("root", "")
    config.data.stats = "cifar10"  # whatever the folder is called
  elif source == "tfds":
    config.data.name = "tfds"
  else:
    raise ValueError(f"source={source!r}: use tfds or folder")
  config.data.image_size = 32
  if config.model.name.startswith("swin"):
    # This project's 32-px Swin (the reference has none for CIFAR-10):
    # patch 2 and window 4 tile its 16x16 token map (patch 4 with the
    # name's window 7 would not tile 8x8).
    config.model.patch_size = 2
    config.model.window_size = 4
  config.tricks.prm_patch_size = 4  # the reference's --patch 4: 8x8 cells
  return config

"""Imagenette with the paper's recipe (the reference's train_imagenette.py).

224x224 input, every model at its native patch size (16 for ViT/DeiT/ConViT,
4 for Swin, window 7); PRM masks a 14x14 grid of 16-px cells for every family
(the reference's --patch 16). Otherwise the CIFAR-10 recipe: PGD-10 at eps
8/255, step 2/255; SGD lr 0.1, momentum 0.9 (0.5 for Swin-T/S/B, as the
reference sets), weight decay 1e-4, clipping 1.0, batch 64, 40 epochs (lr /
10 at 35 and 38); Mixup/CutMix on AT batches; n_w = 10; ImageNet mean/std;
initialised from ImageNet weights (`pretrained=scratch` turns it off); final
evaluation with CW-20, PGD-20, PGD-100 and AutoAttack. The reference trains on
Imagenette v1 (the old full-size imagenette.tgz: train/ and val/ folders of
the 10 classes); `version=v2` selects today's imagenette2 layout, which has
the same folder names. The image_folder source reads root/{train,test}: link
the archive's val/ as test/ once (`ln -s val data/imagenette/test`).

    python main.py --workdir=runs/nette_deit_t_at --config=configs/imagenette.py:\
root=data/imagenette,model=deit_tiny_patch16_224,method=at
    python main.py --workdir=runs/nette_deit_t_at_ardprm --config=configs/imagenette.py:\
root=data/imagenette,model=deit_tiny_patch16_224,method=at,ard_prm=True
    python main.py --workdir=runs/nette_swin_t_at --config=configs/imagenette.py:\
root=data/imagenette,model=swin_tiny_patch4_window7_224

The paper reports clean / PGD-20 / CW-20 / AutoAttack accuracy per model and
method: see the paper's Imagenette results table (no numbers in the
reference's README).

Arguments: model (configs/common.PAPER_MODELS and SWIN_MODELS), method, ard,
prm, ard_prm, pretrained, pretrained_dir as in configs/cifar10.py; root (the
dataset folder); version v1 | v2.
"""

from configs import cifar10
from configs import common
from configs import default

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The `:key=value,...` arguments, as --help and --mode=config list them.
ARGS = {
    "model": "configs/common.PAPER_MODELS or SWIN_MODELS (default "
             "deit_tiny_patch16_224)",
    "method": "at (default) | trades | mart | natural",
    "ard": "True/False: attention random dropping",
    "prm": "True/False: perturbation random masking",
    "ard_prm": "True sets both ard and prm",
    "pretrained": "in1k (default) | in21k | scratch",
    "pretrained_dir": "where the ImageNet weights are (default pretrained)",
    "root": "the dataset folder (default data/imagenette, v2: "
            "data/imagenette2)",
    "version": "v1 (default, the reference's) | v2",
}
_KEYS = tuple(ARGS)


def get_config(arg=None):
  args = common.parse_arg(arg, _KEYS, ("ard", "prm", "ard_prm"))
  config = default.get_config()
  config.model.name = "deit_tiny_patch16_224"
  config.method = "at"
  cifar10.apply_args(config, args)
  version = args.get("version", "v1")
  if version not in ("v1", "v2"):
    raise ValueError(f"version={version!r}: use v1 (the reference's) or v2")
  config.data.name = "image_folder"
  config.data.root = args.get(
      "root", "data/imagenette2" if version == "v2" else "data/imagenette")
  config.data.image_size = 224
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  config.tricks.prm_patch_size = 16  # the reference's --patch 16: 14x14 cells
  # bfloat16 on GPU/TPU, float32 on CPU (logged); the input normalisation and
  # the patch embedding stay float32 so small attack steps are not rounded.
  config.compute_dtype = "auto"
  # Every evaluation (per epoch, final, --mode=eval) in float32 at HIGHEST
  # precision on every backend, as the reference evaluates;
  # --config.eval.compute_dtype="" evaluates in the training dtype
  # (docs/reference_differences.md: the measured bfloat16 gap).
  config.eval.compute_dtype = "float32"
  config.eval.epoch_num_examples = 200
  return config

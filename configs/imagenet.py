"""ImageNet-1k with the paper's recipe (the reference's train_imagenet.py).

PGD-5 AT at eps 4/255, step 1/255; SGD lr 0.1, momentum 0.9 (0.5 for Swin,
as the reference sets), weight decay 1e-4, clipping 1.0, batch 512, 10
epochs (lr / 10 at epoch 5, / 100 at epoch 8); Mixup/CutMix on; n_w = 2;
224x224, patch 16 (Swin: patch 4, window 7); PRM on a 14x14 grid of 16-px
cells for both families (the reference's --patch 16); ImageNet mean/std;
evaluation at eps 4/255 with step 1/255 (CW-20, PGD-20, PGD-100 and
AutoAttack, as the reference's final evaluation). Data: tfds `imagenet2012` (prepare
it once with `tfds build imagenet2012 --manual_dir=... --file_format=array_record`:
random access needs ArrayRecord; pass `--config.data.tfds_data_dir=DIR` if it
is not in the default place), or an image folder (`--config.data.name=
image_folder --config.data.root=DIR` with DIR/train/<wnid>/ and ImageNet's
val/ as DIR/test/<wnid>/). Images are decoded in `data.workers` processes
(default: one per CPU beyond the first). The reference's transforms are the
default (squash to 224, pad-crop 4, flip); `--config.data.train_transform=
random_resized_crop --config.augment.crop_padding=0` trains with
RandomResizedCrop + flip, `--config.data.eval_transform=resize_center_crop`
evaluates on Resize-256 / CenterCrop-224, and `--config.data.eval_subset=
robustbench` (image folder) on RobustBench's 5,000 validation images;
`--mode=eval --config.eval.protocol=robustbench` evaluates a trained run on
them with RobustBench's preprocessing (Res256Crop224; `--config.eval.
robustbench_preprocessing=Res224`, the squash, for this paper's models).

The reference's run_imagenet.sh, here (8 accelerators or more):

    python main.py --workdir=runs/in1k_vitb --config=configs/imagenet.py:\
model=vit_base_patch16_224_in21k
    python main.py --workdir=runs/in1k_vitb_ardprm --config=configs/imagenet.py:\
model=vit_base_patch16_224_in21k,ard_prm=True
    python main.py --workdir=runs/in1k_swinb --config=configs/imagenet.py:\
model=swin_base_patch4_window7_224_in22k
    python main.py --workdir=runs/in1k_swinb_ardprm --config=configs/imagenet.py:\
model=swin_base_patch4_window7_224_in22k,ard_prm=True

Both start from ImageNet-21k weights read from `pretrained_dir` (default
"pretrained"; see configs/common.py); `pretrained=scratch` trains from
random weights. The paper's ImageNet-1k results: see its ImageNet table; the
reference's README links the re-run checkpoints (also on RobustBench) but
states no numbers. `accum_steps=N` splits the 512 batch into N micro-batches
on smaller machines.
"""

from configs import common
from configs import default
from configs import imagenette

# The `:key=value,...` arguments, as --help and --mode=config list them.
ARGS = {
    "model": "vit_base_patch16_224_in21k (default) | "
             "swin_base_patch4_window7_224_in22k",
    "ard": "True/False: attention random dropping",
    "prm": "True/False: perturbation random masking",
    "ard_prm": "True sets both ard and prm",
    "pretrained": "in21k (default) | in1k | scratch",
    "pretrained_dir": "where the ImageNet weights are (default pretrained)",
    "accum_steps": "N micro-batches per 512 batch (default 1)",
}
_KEYS = tuple(ARGS)
MODELS = ("vit_base_patch16_224_in21k", "swin_base_patch4_window7_224_in22k")


def get_config(arg=None):
  args = common.parse_arg(arg,
                          _KEYS, ("ard", "prm", "ard_prm"),
                          int_keys=("accum_steps",))
  config = default.get_config()
  config.model.name = args.get("model", MODELS[0])
  config.method = "at"
  both = args.get("ard_prm", False)
  config.tricks.ard = args.get("ard", both)
  config.tricks.prm = args.get("prm", both)
  common.apply_pretrained(config, args.get("pretrained", "in21k"),
                          args.get("pretrained_dir", "pretrained"))
  config.data.name = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.train_split = "train"
  config.data.test_split = "validation"
  config.data.image_size = 224
  config.data.mean = imagenette.IMAGENET_MEAN
  config.data.std = imagenette.IMAGENET_STD
  config.tricks.prm_patch_size = 16
  # bfloat16 on GPU/TPU, float32 on CPU (logged); the input normalisation and
  # the patch embedding stay float32 so small attack steps are not rounded.
  config.compute_dtype = "auto"
  # Every evaluation (per epoch, final, --mode=eval) in float32 at HIGHEST
  # precision on every backend, as the reference evaluates;
  # --config.eval.compute_dtype="" evaluates in the training dtype
  # (docs/reference_differences.md: the measured bfloat16 gap).
  config.eval.compute_dtype = "float32"
  config.attack.eps = 4 / 255
  config.attack.alpha = 1 / 255
  config.attack.steps = 5
  config.epochs = 10.0
  config.tricks.warmup_epochs = 2.0
  config.batch_size = 512
  config.accum_steps = args.get("accum_steps", 1)
  config.eval.batch_size = 512
  config.eval.alpha = 1 / 255
  config.eval.epoch_num_examples = 1000
  config.log_every_steps = 100
  return config

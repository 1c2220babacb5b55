#!/usr/bin/env bash
# The model AutoAttack's speed is measured on (benchmarks/NOTES.md,
# "AutoAttack on a DeiT-Ti-sized ViT"): DeiT-Ti's width, heads and depth
# (192, 3, 12 blocks) with patch 8 at 32 px (17 tokens, 5.4M params),
# adversarially trained from scratch (PGD-3 at eps 8/255, AdamW 2e-3,
# cosine) for 4 epochs on 10,000 CIFAR-10 training images, then exported
# for timm. About 12 minutes on 2 CPU cores; clean 26.6%, PGD-20 20.2% on
# 500 test images.
#
#   bash scripts/autoattack_model.sh [WORKDIR] [CIFAR10_TAR]
#   python -m benchmarks.autoattack_parity --model=export \
#       --export=WORKDIR/export --correct_only --num_images=50 --eps=0.0627 \
#       --cpu_devices=2 --ours_devices=1,2 --no_compiled_rerun
set -euo pipefail
workdir=${1:-runs/autoattack_model}
tarball=${2:-../shared/data/cifar10-jpeg.tar.gz}
data="$workdir/../autoattack_model_data"
mkdir -p "$data"
[ -d "$data/cifar10" ] || tar -xzf "$tarball" -C "$data"
python main.py --workdir="$workdir" --config=configs/default.py \
  --config.data.name=image_folder --config.data.root="$data/cifar10" \
  --config.data.train_examples=10000 --config.data.test_examples=1000 \
  --config.model.patch_size=8 --config.model.weight_init=xavier_uniform \
  --config.tricks.ard=False --config.tricks.prm=False \
  --config.augment.crop_padding=0 --config.augment.flip=False \
  --config.mixup.prob=0.0 \
  --config.optim.name=adamw --config.optim.lr=2e-3 \
  --config.optim.weight_decay=0.05 --config.optim.schedule=cosine \
  --config.optim.warmup_epochs=1.0 \
  --config.attack.steps=3 --config.attack.alpha=0.0261 \
  --config.batch_size=128 --config.epochs=4.0 \
  --config.eval.epoch_num_examples=0 \
  --config.eval.attacks="('clean','pgd20')" --config.eval.num_examples=500 \
  --config.log_every_steps=20
python main.py --workdir="$workdir" --mode=export

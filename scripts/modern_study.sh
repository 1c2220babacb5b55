#!/usr/bin/env bash
# The modern techniques on real CIFAR-10 at CPU scale (docs/results.md):
# a small ViT (patch 8, width 96, depth 4) adversarially trained with PGD-3
# for 3 epochs on 10,000 training images (1,000 per class), evaluated with
# clean and PGD-20 (eps 8/255) on a class-stratified 500 test images, in
# three arms x three seeds:
#   base       the recipe as is
#   ema        + EMA of the params (decay 0.995 with warm-up; EMA evaluated)
#   eps_warmup + epsilon warm-up over the first epoch (from 0)
#
#   bash scripts/modern_study.sh [OUT_DIR] [CIFAR10_TAR]
#
# Each run's metrics.json is under OUT_DIR/<arm>_s<seed>/; the last step
# prints the comparison (python main.py --mode=report).
set -euo pipefail
out=${1:-runs/modern_study}
tarball=${2:-../shared/data/cifar10-jpeg.tar.gz}
mkdir -p "$out/data"
[ -d "$out/data/cifar10" ] || tar -xzf "$tarball" -C "$out/data"
common=(
  --config=configs/cifar10.py:source=folder,root=$out/data/cifar10,pretrained=scratch
  --config.model.weight_init=xavier_uniform --config.model.patch_size=8
  --config.model.embed_dim=96 --config.model.depth=4 --config.model.num_heads=4
  --config.data.train_examples=10000 --config.data.test_examples=500
  --config.augment.crop_padding=0 --config.augment.flip=False
  --config.mixup.prob=0.0 --config.optim.name=adamw --config.optim.lr=2e-3
  --config.optim.weight_decay=0.05 --config.optim.schedule=cosine
  --config.optim.warmup_epochs=1.0 --config.batch_size=128 --config.epochs=3
  --config.attack.steps=3 --config.attack.alpha=0.026143790849673203
  --config.eval.batch_size=250 '--config.eval.attacks=("clean","pgd20")'
  --config.eval.epoch_num_examples=0 --config.log_every_steps=78
)
declare -A arm_flags=(
  [base]=""
  [ema]="--config.ema.decay=0.995 --config.ema.warmup=True"
  [eps_warmup]="--config.attack.eps_warmup_epochs=1.0"
)
workdirs=()
for seed in 0 1 2; do
  for arm in base ema eps_warmup; do
    workdir="$out/${arm}_s$seed"
    workdirs+=("$workdir")
    [ -f "$workdir/metrics.json" ] && continue
    # shellcheck disable=SC2086
    python main.py --workdir="$workdir" "${common[@]}" \
      --config.seed="$seed" ${arm_flags[$arm]}
  done
done
python main.py --mode=report --workdirs="$(IFS=,; echo "${workdirs[*]}")" \
  --report_dir="$out/report"

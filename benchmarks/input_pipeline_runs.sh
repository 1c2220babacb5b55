#!/bin/bash
# The runs behind the README / NOTES input-pipeline table (folders made by
# benchmarks/make_imagenet_like.py into /tmp/inlike_2k and /tmp/inlike_8k).
cd "$(dirname "$0")/.." || exit 1
# Run inside the project venv (source /work/venv/bin/activate here).
for i in 1 2; do
for spec in "/tmp/inlike_2k 1" "/tmp/inlike_2k 2" "/tmp/inlike_8k 1" "/tmp/inlike_8k 2"; do
  set -- $spec
  echo "== python -m benchmarks.input_pipeline --root=$1 --image_size=224 --workers=$2 --batches=40"
  timeout 300 python -m benchmarks.input_pipeline --root=$1 --image_size=224 --workers=$2 --batches=40 2>&1 | grep -v "^[IW][0-9]"
done
done
echo "== python -m benchmarks.input_pipeline --root=/tmp/inlike_2k --image_size=224 --workers=2 --batches=40 --transform=random_resized_crop"
timeout 300 python -m benchmarks.input_pipeline --root=/tmp/inlike_2k --image_size=224 --workers=2 --batches=40 --transform=random_resized_crop 2>&1 | grep -v "^[IW][0-9]"
echo "== python -m benchmarks.input_pipeline --root=/tmp/inlike_2k --image_size=224 --compare_decoders=200"
python -m benchmarks.input_pipeline --root=/tmp/inlike_2k --image_size=224 --compare_decoders=200

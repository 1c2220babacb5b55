"""Makes an ImageNet-like image folder from the shared CIFAR-10 JPEGs.

Each CIFAR-10 image is upscaled (bicubic) to 500x375, the average size of
an ImageNet training photo, given mild pixel noise so the JPEG carries
about as much detail as a photograph (an upscaled 32x32 image alone is
unusually smooth and decodes faster than a real photo), and saved at
quality 90: root/train/<class>/*.JPEG and root/test/<class>/*.JPEG.

    python -m benchmarks.make_imagenet_like --out=/tmp/inlike_2k --train=2000
    python -m benchmarks.make_imagenet_like --out=/tmp/inlike_8k --train=8000

The CIFAR-10 folder comes from /work/shared/data/cifar10-jpeg.tar.gz (or
--cifar10_tar), unpacked once into ~/.cache/vitat_jax/cifar10-jpeg as the
tests do.

Run from the repository root, as a module (`python -m benchmarks.make_imagenet_like`):
the checkout's `vitat_jax` and `tests` then import without a path set up here.
"""

import argparse
import os
import pathlib

import numpy as np
from PIL import Image

_REPO = pathlib.Path(__file__).resolve().parents[1]


def make(cifar10_root: pathlib.Path,
         out: pathlib.Path,
         num_train: int,
         num_test: int,
         size=(500, 375),
         noise: float = 20.0,
         seed: int = 0):
  """Writes the folder; returns the mean file size in bytes."""
  rng = np.random.default_rng(seed)
  classes = sorted(p.name for p in (cifar10_root / "train").iterdir())
  sizes = []
  for split, count in (("train", num_train), ("test", num_test)):
    per_class = -(-count // len(classes))
    for class_name in classes:
      src = sorted((cifar10_root / split / class_name).iterdir())[:per_class]
      dst = out / split / class_name
      dst.mkdir(parents=True, exist_ok=True)
      for path in src:
        image = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
        pixels = np.asarray(image, np.float32)
        pixels += rng.normal(0, noise, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        target = dst / (path.stem + ".JPEG")
        image.save(target, quality=90)
        sizes.append(os.path.getsize(target))
  return float(np.mean(sizes))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--test", type=int, default=100)
  parser.add_argument("--noise", type=float, default=20.0)
  parser.add_argument("--cifar10_tar",
                      default=str(_REPO.parent /
                                  "shared/data/cifar10-jpeg.tar.gz"))
  args = parser.parse_args(argv)
  from tests import conftest  # pylint: disable=g-import-not-at-top
  root = conftest._unpack(
      pathlib.Path(args.cifar10_tar),  # pylint: disable=protected-access
      conftest._CACHE_DIR)  # pylint: disable=protected-access
  mean_bytes = make(root,
                    pathlib.Path(args.out),
                    args.train,
                    args.test,
                    noise=args.noise)
  print(f"wrote {args.train} train and {args.test} test JPEGs (500x375, q90, "
        f"mean {mean_bytes / 1024:.0f} KiB) under {args.out}")


if __name__ == "__main__":
  main()

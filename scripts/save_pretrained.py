"""Saves the reference's pre-trained weights where the paper configs look.

Needs internet access and timm (requirements-dev.txt); run it once, on any
machine, then copy the directory:

    python scripts/save_pretrained.py --dir=pretrained deit_tiny_patch16_224
    python scripts/save_pretrained.py --dir=pretrained --all

Each model is saved as `<dir>/<model>.safetensors` from the timm tag (or, for
the legacy ViT-S, the release URL) in configs/common.REFERENCE_WEIGHTS: the
same files the reference's `pretrained=True` loads.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # pylint: disable=g-import-not-at-top


def _state_dict(source: str):
  import torch  # pylint: disable=g-import-not-at-top
  if source.startswith("https://"):
    return torch.hub.load_state_dict_from_url(source,
                                              map_location="cpu",
                                              weights_only=True)
  import timm  # pylint: disable=g-import-not-at-top
  return timm.create_model(source, pretrained=True).state_dict()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("models", nargs="*", help="model names (the configs')")
  parser.add_argument("--dir", required=True, help="the pretrained_dir")
  parser.add_argument("--all",
                      action="store_true",
                      help="every model of configs/common.REFERENCE_WEIGHTS")
  parser.add_argument("--dry_run",
                      action="store_true",
                      help="print what would be saved, download nothing")
  args = parser.parse_args(argv)
  names = list(common.REFERENCE_WEIGHTS) if args.all else args.models
  unknown = [n for n in names if n not in common.REFERENCE_WEIGHTS]
  if not names or unknown:
    print(
        f"error: unknown model(s) {', '.join(unknown) or '(none given)'}: "
        f"use --all or some of {', '.join(common.REFERENCE_WEIGHTS)}",
        file=sys.stderr)
    return 2
  for name in names:
    source = common.REFERENCE_WEIGHTS[name]
    path = os.path.join(args.dir, name + ".safetensors")
    print(f"{name}: {source} -> {path}")
    if args.dry_run:
      continue
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    os.makedirs(args.dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in _state_dict(source).items()}
    safetensors.torch.save_file(state, path)
  return 0


if __name__ == "__main__":
  sys.exit(main())

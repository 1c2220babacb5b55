"""CIFAR-10 with the paper's recipe (Mo et al. 2022, Section 3 and Table 1).

32x32 input with patch 4 (an 8x8 grid), PGD-10 AT at eps 8/255, step 2/255;
SGD lr 0.1, momentum 0.9, weight decay 1e-4, global-norm clipping 1.0, batch
64, 40 epochs with the lr divided by 10 at epochs 35 and 38; ARD/PRM warm-up
over n_w = 10 epochs; evaluation with PGD-20 and CW-20 on the test set.

Bundled choices go through the `:` argument, single fields through flags:

    python main.py --workdir=runs/deit_t_at \
      --config=configs/cifar10.py:model=deit_tiny_patch16_224,method=at,ard=True,prm=True
    python main.py --workdir=runs/x \
      --config=configs/cifar10.py:source=folder,root=/data/cifar10

`source=tfds` (default) reads `tfds.data_source("cifar10")` from a prepared
tfds data dir; `source=folder` reads root/{train,test}/<class>/*.jpg (e.g.
the JPEG copy in ../shared/data unpacked). The paper's CIFAR-10 numbers
start from ImageNet pre-trained weights; from scratch, ViTs reach far less.
"""

from configs import default

_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_KEYS = ("model", "method", "ard", "prm", "source", "root")


def parse_arg(arg):
  """'model=x,ard=True' -> {'model': 'x', 'ard': True}; unknown keys rejected."""
  values = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in _KEYS:
      raise ValueError(f"bad config argument {item!r}: use key=value with "
                       f"keys {', '.join(_KEYS)}")
    value = value.strip()
    if key in ("ard", "prm"):
      if value.lower() not in _BOOLS:
        raise ValueError(f"{key}={value!r} must be True or False")
      value = _BOOLS[value.lower()]
    values[key] = value
  return values


def get_config(arg=None):
  args = parse_arg(arg)
  config = default.get_config()
  config.model.name = args.get("model", "deit_tiny_patch16_224")
  config.model.patch_size = 4
  config.method = args.get("method", "at")
  config.ard = args.get("ard", False)
  config.prm = args.get("prm", False)
  source = args.get("source", "tfds")
  if source == "folder":
    config.data.name = "image_folder"
    config.data.root = args.get("root", "")
  elif source == "tfds":
    config.data.name = "tfds"
  else:
    raise ValueError(f"source={source!r}: use tfds or folder")
  config.data.image_size = 32
  return config

"""timm's pre-processing of each registered model family, in one table.

    prep = preprocessing.timm_preprocessing("deit_tiny_patch16_224")
    prep.image_size, prep.mean, prep.std, prep.crop_pct, prep.interpolation

What a pre-trained timm checkpoint expects of its input: the image side it
was trained at (the registered name's `img_size`), the normalisation, and
timm's evaluation resize (Resize(image_size / crop_pct), CenterCrop, with
`interpolation`). `--mode=eval` of an external checkpoint without a model
card normalises with this table (`pretrained.native`).

Sources, checked against `timm.models.get_pretrained_cfg(name)` of timm
1.0.31 for every registered name (tests/test_native_eval.py):
- deit_*: timm/models/deit.py's `_cfg` (IMAGENET_DEFAULT_MEAN/STD, crop_pct
  0.9, bicubic; the 384-px models crop_pct 1.0), as Touvron et al.'s
  facebookresearch/deit trained them;
- vit_*: timm/models/vision_transformer.py's cfgs of the Google checkpoints
  (augreg and the original in21k): IMAGENET_INCEPTION_MEAN/STD, i.e.
  0.5/0.5, crop_pct 0.9 (384 px: 1.0), bicubic;
- vit_small_patch16_224_legacy, the reference's `vit_small_patch16_224` of
  timm 0.4.x (Ross Wightman's own ImageNet training,
  vit_small_p16_224-15ec54c9.pth): that version's `_cfg` defaults,
  IMAGENET_DEFAULT_MEAN/STD, crop_pct 0.9, bicubic;
- convit_*: timm/models/convit.py's `_cfg` (IMAGENET_DEFAULT_MEAN/STD,
  crop_pct 0.875, bicubic);
- swin_*: timm/models/swin_transformer.py's `_cfg` (IMAGENET_DEFAULT_MEAN/STD,
  crop_pct 0.9, bicubic; the 384-px models crop_pct 1.0).
"""

import dataclasses
from typing import Tuple

from vitat_jax import models
from vitat_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# (name prefix, mean, std, crop_pct below 384 px, interpolation); the first
# matching prefix wins. At 384 px and above every family crops nothing
# (crop_pct 1.0).
TIMM_FAMILIES = (
    ("vit_small_patch16_224_legacy", IMAGENET_MEAN, IMAGENET_STD, 0.9,
     "bicubic"),
    ("deit_", IMAGENET_MEAN, IMAGENET_STD, 0.9, "bicubic"),
    ("vit_", INCEPTION_MEAN, INCEPTION_STD, 0.9, "bicubic"),
    ("convit_", IMAGENET_MEAN, IMAGENET_STD, 0.875, "bicubic"),
    ("swin_", IMAGENET_MEAN, IMAGENET_STD, 0.9, "bicubic"),
)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What a timm checkpoint expects: [0, 1] RGB images of `image_size`,
  normalised with `mean`/`std`; timm evaluates them after
  Resize(image_size / crop_pct, `interpolation`) and CenterCrop."""
  image_size: int
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  crop_pct: float
  interpolation: str


def timm_preprocessing(name: str) -> Preprocessing:
  """The table's pre-processing of the registered timm model `name`."""
  image_size = int(models.model_defaults(name)["img_size"])
  for prefix, mean, std, crop_pct, interpolation in TIMM_FAMILIES:
    if name.startswith(prefix):
      return Preprocessing(image_size, mean, std,
                           1.0 if image_size >= 384 else crop_pct,
                           interpolation)
  raise UserError(f"no timm pre-processing is known for {name!r}: give its "
                  "normalisation (the config's data mean and std), or put "
                  "the model card (model_card.json) beside the checkpoint")

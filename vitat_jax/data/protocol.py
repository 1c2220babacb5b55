"""Evaluation protocols: which test images an evaluation reads, and how.

    splits = data.load(protocol.data_config(config))
    count = protocol.robustbench_num_examples(config)

`eval.protocol=''` evaluates the configured test split. `'robustbench'`
evaluates RobustBench's fixed set: CIFAR-10's first 10,000 test images
(tfds), or ImageNet's 5,000 listed validation files (an image folder) with
RobustBench's preprocessing, whatever the run trained with.
"""

import ml_collections

from vitat_jax.errors import UserError

# RobustBench's evaluation sets: (data set, number of test images).
# CIFAR-10: the first 10,000 test images (tfds), unresized. ImageNet: the
# 5,000 listed validation files (an image folder), at 224 px.
ROBUSTBENCH_SETS = {"cifar10": 10_000, "imagenet": 5_000}
# RobustBench's ImageNet preprocessings (robustbench.data.PREPROCESSINGS)
# as this library's eval transforms: Resize(256) + CenterCrop(224), its
# default, and Resize([224, 224]), which it uses for this paper's models.
ROBUSTBENCH_PREPROCESSING = {
    "Res256Crop224":
        dict(eval_transform="resize_center_crop", crop_pct=224 / 256),
    "Res224":
        dict(eval_transform="squash"),
}
PROTOCOLS = ("", "robustbench")


def robustbench_set(config) -> str:
  """The RobustBench set `eval.protocol='robustbench'` means for this data
  config ('cifar10' or 'imagenet'); else a one-line error."""
  data = config.data
  if data.name == "image_folder":
    preprocessing = config.eval.robustbench_preprocessing
    if preprocessing not in ROBUSTBENCH_PREPROCESSING:
      raise UserError(
          f"eval.robustbench_preprocessing={preprocessing!r}: use one of "
          f"{', '.join(ROBUSTBENCH_PREPROCESSING)} (RobustBench's names)")
    if data.image_size != 224:
      raise UserError(f"eval.protocol='robustbench' on ImageNet evaluates at "
                      f"224 px; this model takes data.image_size="
                      f"{data.image_size}")
    return "imagenet"
  name = data.tfds_name if data.name == "tfds" else data.name
  if data.name == "tfds" and name == "cifar10":
    if data.test_split != "test" or data.test_examples or data.image_size != 32:
      raise UserError("eval.protocol='robustbench' needs the whole CIFAR-10 "
                      "test split at 32 px: data.test_split='test', "
                      "data.test_examples=0, data.image_size=32")
    return "cifar10"
  raise UserError(f"eval.protocol='robustbench' is defined here for cifar10 "
                  f"(data.name='tfds') and ImageNet (data.name="
                  f"'image_folder' with ImageNet's val/ as root/test/), not "
                  f"for data {name!r}")


def robustbench_num_examples(config) -> int:
  """How many images of the RobustBench set the protocol evaluates: all of
  them, or the first `eval.num_examples`."""
  count = ROBUSTBENCH_SETS[robustbench_set(config)]
  if config.eval.num_examples > count:
    raise UserError(f"eval.num_examples={config.eval.num_examples}: the "
                    f"RobustBench set has {count} images")
  return config.eval.num_examples or count


def data_config(config):
  """`config.data` as `eval.protocol` evaluates it: on ImageNet the
  RobustBench protocol reads its 5,000 files with its preprocessing,
  whatever the run trained with (the test split only)."""
  if (config.eval.protocol != "robustbench" or
      robustbench_set(config) != "imagenet"):
    return config.data
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_subset = "robustbench"
  data.test_examples = 0
  data.update(ROBUSTBENCH_PREPROCESSING[config.eval.robustbench_preprocessing])
  return data


def check_fields(config) -> None:
  """One-line errors for `eval.protocol` and its fields (called by
  `validate.check_config`)."""
  ev = config.eval
  if ev.protocol not in PROTOCOLS:
    raise UserError(f"unknown eval.protocol {ev.protocol!r}: use '' (the "
                    "configured test images) or 'robustbench'")
  if ev.protocol == "robustbench":
    robustbench_num_examples(config)

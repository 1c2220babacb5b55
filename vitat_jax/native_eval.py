"""`--mode=eval` of an external checkpoint (`init.checkpoint`): the network
as timm defines it (`pretrained.native`), its test images and the config
the evaluation runs with. `setup.prepare` calls, in order:

    spec = native_eval.external_model(config)          # shapes and card only
    data_config = native_eval.data_config(config, data_config, spec)
    splits = data.load(data_config, train=False)
    config = native_eval.evaluated_config(config, spec, splits, data_config)

Images of another size than the model's are refused in one line naming
`eval.resize_to_model` and `init.resample` (with `init.resample=True`
`setup` uses the config's model, resampled, instead of these).
"""

from absl import logging
import ml_collections

from vitat_jax.errors import UserError
from vitat_jax.pretrained import native as native_lib


def external_model(config) -> native_lib.NativeModel:
  """The timm network of `init.checkpoint`, for its evaluation (shapes and
  the card only; nothing decoded or compiled)."""
  mean, std = config.data.get("mean"), config.data.get("std")
  explicit = bool(mean) and bool(std)  # checked by data.check_config
  spec = native_lib.native_model(
      config.init.checkpoint,
      config.model.name,
      mean=tuple(mean) if explicit else None,
      std=tuple(std) if explicit else None,
      architecture={
          k: v for k, v in config.model.items() if k != "name"
      },
      strict_name=False,
      name_flag="--config.model.name",
      format=config.init.format,
      allow_pickle=config.init.allow_pickle)
  if spec.name != config.model.name:
    logging.warning("model.name=%s not used: %s", config.model.name,
                    spec.source)
  if config.init.resample:
    logging.warning(
        "init.resample=True: %s, %s, is resampled to the data's sizes; the "
        "evaluated network is not the one timm defines", config.init.checkpoint,
        spec.describe())
  return spec


def _refuse_other_size(config, spec, data_size: int) -> None:
  """The one-line refusal of test images whose size is not the model's."""
  if data_size and data_size != spec.image_size:
    raise UserError(
        f"{config.init.checkpoint} holds timm's {spec.describe()}; the test "
        f"images are {data_size} px: "
        f"pass --config.eval.resize_to_model=True to resize them to "
        f"{spec.image_size} px, or --config.init.resample=True to resample "
        f"the model to {data_size} px")


def data_config(config, data_config, spec):
  """`data_config` as the evaluation of `spec` reads it: resized to the
  model's size with `eval.resize_to_model`, else refused if of another
  size (a size that comes from the files is checked after the listing)."""
  if not config.eval.resize_to_model:
    _refuse_other_size(config, spec, data_config.image_size)
    return data_config
  data_config = ml_collections.ConfigDict(data_config.to_dict())
  if data_config.image_size != spec.image_size:
    logging.info(
        "eval.resize_to_model: the test images are resized to %d px by "
        "data.eval_transform=%s", spec.image_size, data_config.eval_transform)
  data_config.image_size = spec.image_size
  return data_config


def _native_config(config, spec, data_config):
  """The config the evaluation of `spec` runs with: its model section is
  the timm network, its data the test images as read."""
  native = ml_collections.ConfigDict(config.to_dict())
  native.model = ml_collections.ConfigDict({"name": spec.name, **spec.kwargs})
  native.data = ml_collections.ConfigDict(data_config.to_dict())
  native.data.update(mean=spec.mean, std=spec.std)
  return native


def _log_native(config, spec, splits) -> None:
  ignored = [
      f"model.{k}={config.model[k]}" for k in native_lib.SIZE_KEYWORDS
      if config.model.get(k) is not None and
      config.model[k] != spec.kwargs.get(k, config.model[k])
  ]
  if ignored:
    logging.info(
        "%s not used: the checkpoint's own sizes are evaluated "
        "(--config.init.resample=True resamples it)", ", ".join(ignored))
  prep = spec.preprocessing
  resize = (f"; timm evaluates it after Resize(size / {prep.crop_pct}, "
            f"{prep.interpolation}) + CenterCrop" if prep else "")
  logging.info(
      "evaluating %s as timm's %s; from %s: mean %s, std %s (not the data "
      "set's)%s; the %d test images are read at %d px", config.init.checkpoint,
      spec.describe(), spec.source, spec.mean, spec.std, resize,
      len(splits.test), splits.image_size)


def _check_head_classes(config, spec, splits) -> None:
  if spec.num_classes != splits.num_classes:
    raise UserError(
        f"{config.init.checkpoint} classifies {spec.num_classes} classes, the "
        f"test split has {splits.num_classes}: evaluate it on data of its "
        "classes, or fine-tune it first (train with --config.init.checkpoint)")


def evaluated_config(config, spec, splits, data_config):
  """The config the evaluation of `spec` runs with, after the test split is
  listed: refused in one line if its images' size or class count is not the
  checkpoint's; logged."""
  _refuse_other_size(config, spec, splits.image_size)
  _check_head_classes(config, spec, splits)
  _log_native(config, spec, splits)
  return _native_config(config, spec, data_config)

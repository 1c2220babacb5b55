"""Image data: sources (digits, image folders, tfds), batching, augmentation.

    splits = data.load(config.data)
    for images, labels in data.train_batches(splits.train, 64, seed=0,
                                             workers=2): ...
    images = data.random_crop_flip(key, data.to_float(images))
"""

from vitat_jax.data.augment import apply_crop_flip
from vitat_jax.data.augment import crop_flip_params
from vitat_jax.data.augment import random_crop_flip
from vitat_jax.data.augment import to_float
from vitat_jax.data.pipeline import epoch_permutation
from vitat_jax.data.pipeline import Extra
from vitat_jax.data.pipeline import eval_batches
from vitat_jax.data.pipeline import steps_per_epoch
from vitat_jax.data.pipeline import train_batches
from vitat_jax.data.decode import Transform
from vitat_jax.data.folder import FileSource
from vitat_jax.data.folder import robustbench_imagenet_ids
from vitat_jax.data.sources import ArraySource
from vitat_jax.data.sources import check_config
from vitat_jax.data.sources import DataSplits
from vitat_jax.data.sources import extra_rows
from vitat_jax.data.sources import load
from vitat_jax.data.sources import Source
from vitat_jax.data.sources import TfdsSource

__all__ = [
    "ArraySource",
    "DataSplits",
    "Extra",
    "FileSource",
    "Source",
    "TfdsSource",
    "Transform",
    "apply_crop_flip",
    "check_config",
    "crop_flip_params",
    "epoch_permutation",
    "eval_batches",
    "extra_rows",
    "load",
    "random_crop_flip",
    "robustbench_imagenet_ids",
    "steps_per_epoch",
    "to_float",
    "train_batches",
]

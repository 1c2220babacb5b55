"""configs/imagenet.py and configs/imagenette.py train one step end to end:
on a tiny ArrayRecord tfds dataset written here and on a tiny image folder,
with the ImageNet transforms and loader workers."""

import numpy as np
from PIL import Image
import pytest

from configs import imagenet
from configs import imagenette
from tests.data.test_sources import VitatTestTinyGray
from vitat_jax import train

_TINY_MODEL = {
    "model.embed_dim": 16,
    "model.depth": 1,
    "model.num_heads": 2,
    "data.image_size": 32,
    "batch_size": 8,
    "accum_steps": 1,
    "attack.steps": 1,
    "tricks.warmup_epochs": 0.0,
    "eval.batch_size": 8,
    "eval.num_examples": 8,
    "eval.attacks": ("clean",),
    "eval.epoch_num_examples": 0,
    "log_every_steps": 1,
    "checkpoint_every_steps": 1000,
    "data.train_transform": "random_resized_crop",
    "data.eval_transform": "resize_center_crop",
    "augment.crop_padding": 0
}


def _one_step(config, workdir, steps_per_epoch):
  config.epochs = 1.0 / steps_per_epoch
  config.update_from_flattened_dict(_TINY_MODEL)
  result = train.train_and_evaluate(config, str(workdir))
  assert result["steps"] == 1
  assert result["num_eval_images"] == 8
  assert 0.0 <= result["clean_acc"] <= 1.0
  return result


def test_imagenet_config_on_a_tiny_array_record_dataset(tmp_path):
  data_dir = tmp_path / "tfds"
  VitatTestTinyGray(data_dir=str(data_dir),
                    file_format="array_record").download_and_prepare()
  config = imagenet.get_config("pretrained=scratch")
  config.data.tfds_name = "vitat_test_tiny_gray"
  config.data.tfds_data_dir = str(data_dir)
  config.data.test_split = "test"
  config.data.workers = 0  # pickling into workers: test_sources
  _one_step(config, tmp_path / "run", steps_per_epoch=30 // 8)


def test_imagenette_config_on_a_tiny_folder_read_lazily(tmp_path):
  rng = np.random.default_rng(0)
  for split, count in (("train", 8), ("test", 4)):
    for class_name in ("n01440764", "n02102040"):
      class_dir = tmp_path / "nette" / split / class_name
      class_dir.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (48, 64, 3), np.uint8)
        Image.fromarray(image).save(class_dir / f"{i}.JPEG", quality=90)
  config = imagenette.get_config(f"root={tmp_path / 'nette'},"
                                 "pretrained=scratch")
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.decoded_cache_mb = 0  # read file by file, in the default
  # number of workers (one per CPU beyond the first, so >= 1)
  _one_step(config, tmp_path / "run", steps_per_epoch=16 // 8)


if __name__ == "__main__":
  pytest.main([__file__])

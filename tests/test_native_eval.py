"""`--mode=eval` of an external timm checkpoint evaluates timm's network.

timm's `deit_tiny_patch16_224` (random weights, 10 classes) is saved as
.safetensors; an image folder read with the CIFAR-10 recipe (whose
`data.stats=cifar10` are the data set's statistics, not the model's) holds
200 test images of 224 px and no train/ at all.
Each image's folder is timm's own prediction for it, so a clean accuracy of
200/200 is the argmax of every image agreeing with timm's. One compiled
evaluation.
"""

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from configs import cifar10
from vitat_jax import eval_only
from vitat_jax import setup
from vitat_jax import state as state_lib
from vitat_jax.data import folder
from vitat_jax.errors import UserError
from vitat_jax.pretrained import io as pretrained_io
from vitat_jax.pretrained import preprocessing

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

NAME = "deit_tiny_patch16_224"
NUM_IMAGES = 200
NUM_CLASSES = 10


def _images(count, size, seed):
  """uint8 [count, size, size, 3]: blocky random images (cheap PNGs)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
  return np.kron(coarse, np.ones((1, size // 8, size // 8, 1), np.uint8))


def _timm_logits(model, images):
  mean = torch.tensor(preprocessing.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(preprocessing.IMAGENET_STD).view(1, 3, 1, 1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    return model((x - mean) / std).numpy()


def _write_folder(root, images, labels):
  for c in range(NUM_CLASSES):
    os.makedirs(root / "test" / f"class_{c}", exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image).save(root / "test" / f"class_{label}" /
                                f"{i:03d}.png")


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
  """(checkpoint path, image folder root, images, timm's logits, seconds of
  timm's forward)."""
  tmp = tmp_path_factory.mktemp("native")
  torch.manual_seed(0)
  model = timm.create_model(NAME, pretrained=False,
                            num_classes=NUM_CLASSES).eval()
  with torch.no_grad():  # larger logits: the predictions spread over classes
    model.head.weight.mul_(20.0)
  path = str(tmp / "deit_tiny.safetensors")
  pretrained_io.write_safetensors(
      {
          k: v.numpy() for k, v in model.state_dict().items()
      }, path)
  images = _images(NUM_IMAGES, 224, seed=0)
  start = time.perf_counter()
  logits = _timm_logits(model, images)
  timm_seconds = time.perf_counter() - start
  root = tmp / "cifar10"
  _write_folder(root, images, logits.argmax(-1))
  return path, root, images, logits, timm_seconds


def _config(path, root, tmp, **overrides):
  config = cifar10.get_config(f"source=folder,root={root},pretrained=scratch")
  config.init.checkpoint = path
  config.data.cache_dir = str(tmp / "cache")
  config.data.workers = 0
  config.eval.attacks = ("clean",)
  config.eval.num_examples = 0
  config.eval.batch_size = 100
  config.compilation_cache_dir = ""
  config.update_from_flattened_dict(overrides)
  return config


def test_eval_of_a_timm_checkpoint_predicts_as_timm(timm_checkpoint, tmp_path,
                                                    monkeypatch, caplog):
  path, root, images, timm_logits, timm_seconds = timm_checkpoint
  opened = []
  for name in ("list_images", "index_split", "decoded_split"):
    real = getattr(folder, name)

    def spy(*args, _real=real, **kwargs):
      opened.append(str(args[0]) + " " + " ".join(map(str, args[1:2])))
      return _real(*args, **kwargs)

    monkeypatch.setattr(folder, name, spy)
  config = _config(path, root, tmp_path, **{"data.image_size": 224})
  with caplog.at_level(logging.INFO, logger="absl"):
    start = time.perf_counter()
    result = eval_only.evaluate_checkpoint(config, str(tmp_path / "eval"))
    seconds = time.perf_counter() - start
  # Every one of the 200 argmaxes is timm's (the labels are timm's).
  assert result["num_eval_images"] == NUM_IMAGES
  assert result["clean_acc"] == 1.0, result["clean_acc"]
  assert len(set(timm_logits.argmax(-1))) >= 3  # not one class for all
  # Timm's network as it is: no resampling, its own normalisation.
  log = caplog.text
  assert "resampled" not in log and "resized" not in log
  assert f"as timm's {NAME} (224 px, patch 16, 10 classes)" in log
  assert "mean (0.485, 0.456, 0.406)" in log
  assert "model.patch_size=4 not used" in log  # the CIFAR recipe's patch 4
  # The test split alone was listed and decoded; there is no train/.
  assert opened and all("train" not in entry for entry in opened), opened
  assert not (root / "train").exists()
  # The same network's logits, eagerly on a few of the images.
  run = setup.prepare(config, str(tmp_path / "eval"), "eval")
  params = state_lib.checkpoint_params(run.config, run.model)
  ours = np.asarray(
      run.model.apply({"params": params}, images[:8].astype(np.float32) / 255))
  difference = float(np.abs(ours - timm_logits[:8]).max())
  print(f"max |logit difference| over 8 images: {difference:.2e}; "
        f"--mode=eval of {NUM_IMAGES} images at 224 px: {seconds:.1f} s "
        f"(timm's forward: {timm_seconds:.1f} s)")
  assert difference < 1e-3


def test_data_of_another_size_is_refused_naming_the_flags(
    timm_checkpoint, tmp_path):
  path, root, _, _, _ = timm_checkpoint
  # The CIFAR-10 recipe's 32-px data, refused before anything is read.
  with pytest.raises(UserError) as error:
    setup.prepare(_config(path, root, tmp_path), str(tmp_path), "eval")
  message = str(error.value)
  assert "\n" not in message
  assert "--config.eval.resize_to_model=True" in message
  assert "--config.init.resample=True" in message
  assert "224" in message and "32 px" in message
  assert not (tmp_path / "cache").exists()  # nothing decoded


def test_resampling_when_asked_warns_and_resizing_reads_at_224(
    timm_checkpoint, tmp_path, caplog):
  path, _, _, _, _ = timm_checkpoint
  root = tmp_path / "small"
  _write_folder(root, _images(NUM_CLASSES, 32, seed=1), range(NUM_CLASSES))
  with caplog.at_level(logging.INFO, logger="absl"):
    run = setup.prepare(
        _config(path, root, tmp_path, **{"init.resample": True}), str(tmp_path),
        "eval")
  assert run.native is None and run.model.img_size == 32
  assert run.model.mean == preprocessing.IMAGENET_MEAN  # the model's
  resampled = [r for r in caplog.records if "resampled" in r.getMessage()]
  assert resampled and all(r.levelno == logging.WARNING for r in resampled)
  run = setup.prepare(
      _config(path, root, tmp_path, **{"eval.resize_to_model": True}),
      str(tmp_path), "eval")
  assert run.native is not None and run.model.img_size == 224
  assert run.splits.test.get_batch([0])[0].shape == (1, 224, 224, 3)


def test_a_head_of_another_class_count_is_refused(timm_checkpoint, tmp_path):
  path, _, _, _, _ = timm_checkpoint
  root = tmp_path / "three"
  for c in range(3):
    os.makedirs(root / "test" / str(c))
    Image.fromarray(_images(1, 224,
                            seed=c)[0]).save(root / "test" / str(c) / "a.png")
  with pytest.raises(UserError,
                     match="classifies 10 classes, the test split "
                     "has 3"):
    setup.prepare(_config(path, root, tmp_path, **{"data.image_size": 224}),
                  str(tmp_path), "eval")


def test_the_preprocessing_table_is_timm_s():
  from timm.models import _registry  # pylint: disable=g-import-not-at-top
  from vitat_jax import models
  for name in models.list_models():
    prep = preprocessing.timm_preprocessing(name)
    assert prep.mean == tuple(models.model_defaults(name)["mean"]), name
    if name.endswith("_legacy"):  # timm 0.4's name, gone from timm 1.x
      continue
    cfg = timm.models.get_pretrained_cfg(
        _registry._deprecated_models.get(name, name))  # pylint: disable=protected-access
    assert (prep.image_size, prep.mean, prep.std, prep.crop_pct,
            prep.interpolation) == (cfg.input_size[1], tuple(cfg.mean),
                                    tuple(cfg.std), cfg.crop_pct,
                                    cfg.interpolation), name


def test_a_model_card_beside_the_checkpoint_wins(timm_checkpoint, tmp_path,
                                                 caplog):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  path, _, _, _, _ = timm_checkpoint
  exported = tmp_path / "export"
  exported.mkdir()
  shutil.copy(path, exported / "model.safetensors")
  (exported / "model_card.json").write_text(
      json.dumps({
          "timm": {
              "name": NAME,
              "kwargs": {
                  "num_classes": NUM_CLASSES,
                  "img_size": 224
              }
          },
          "input": {
              "mean": [0.5] * 3,
              "std": [0.25] * 3
          }
      }))
  root = tmp_path / "small"
  _write_folder(root, _images(NUM_CLASSES, 32, seed=2), range(NUM_CLASSES))
  config = _config(
      str(exported / "model.safetensors"), root, tmp_path, **{
          "eval.resize_to_model": True,
          "model.name": "vit_tiny_patch16_224"
      })
  with caplog.at_level(logging.INFO, logger="absl"):
    run = setup.prepare(config, str(tmp_path), "eval")
  assert run.native.source.startswith("the model card")
  assert run.model.mean == (0.5,) * 3 and run.model.std == (0.25,) * 3
  assert run.config.model.name == NAME
  assert "model.name=vit_tiny_patch16_224 not used" in caplog.text

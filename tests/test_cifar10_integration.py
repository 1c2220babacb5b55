"""Real CIFAR-10: adversarial training buys robustness that natural training lacks.

A micro ViT (patch 8, width 96, depth 4) on 10,000 real training images
(1,000 per class) and 500 held-out test images, trained adversarially (PGD-3
with ARD and PRM, 2 epochs); PGD-20 at eps 8/255 must separate it clearly
from natural training. TRADES and MART (PGD-3, ARD+PRM, 2 epochs on 5,000
images) must likewise beat the natural run. One natural run (2 epochs on
5,000 images) serves all three tests. Skips only when the CIFAR-10 archive
is absent.
"""

import pytest

from configs import cifar10
from vitat_jax import train

pytestmark = pytest.mark.slow


def _config(root, **overrides):
  # From random weights, Xavier-initialised: the small recipe these
  # thresholds were measured with (not the paper's pre-trained setting).
  config = cifar10.get_config(f"model=deit_tiny_patch16_224,source=folder,"
                              f"root={root},pretrained=scratch")
  config.model.weight_init = "xavier_uniform"
  config.model.patch_size = 8
  config.model.embed_dim = 96
  config.model.depth = 4
  config.model.num_heads = 4
  config.data.train_examples = 10_000
  config.data.test_examples = 500
  config.augment.crop_padding = 0  # hurts at these tiny budgets
  config.augment.flip = False
  config.mixup.prob = 0.0
  config.optim.name = "adamw"
  config.optim.lr = 2e-3
  config.optim.weight_decay = 0.05
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 1.0
  config.batch_size = 128
  config.eval.batch_size = 250
  config.eval.attacks = ("clean", "pgd20")
  config.eval.epoch_num_examples = 0
  config.log_every_steps = 78
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def natural_5k(cifar10_root, tmp_path_factory):
  """The one natural run: 2 epochs on 5,000 images (no attack to fail it).

  Measured (2 cores): clean 0.334, PGD-20 0.004. The first test's own
  natural run on 10,000 images measured clean 0.388, PGD-20 0.000: against
  this one each of its assertions is at least as hard to meet.
  """
  return train.train_and_evaluate(
      _config(cifar10_root,
              method="natural",
              epochs=2.0,
              **{"data.train_examples": 5_000}),
      str(tmp_path_factory.mktemp("natural_5k")))


def test_adversarial_training_is_robust_on_real_cifar10(cifar10_root, tmp_path,
                                                        natural_5k):
  # Measured (2 cores): 2 epochs clean 0.240, PGD-20 0.178 (3 epochs: 0.272,
  # 0.188, for a third more time).
  adversarial = train.train_and_evaluate(
      _config(cifar10_root,
              method="at",
              epochs=2.0,
              **{
                  "tricks.ard": True,
                  "tricks.prm": True,
                  "tricks.warmup_epochs": 1.0,
                  "attack.steps": 3,
                  "attack.alpha": 2.5 * (8 / 255) / 3
              }), str(tmp_path / "at"))
  natural = natural_5k
  print(f"AT: clean {adversarial['clean_acc']:.3f} pgd20 "
        f"{adversarial['pgd20_acc']:.3f} ({adversarial['wall_time_s']:.0f} s); "
        f"natural: clean {natural['clean_acc']:.3f} pgd20 "
        f"{natural['pgd20_acc']:.3f} ({natural['wall_time_s']:.0f} s)")
  assert adversarial["num_eval_images"] == natural["num_eval_images"] == 500
  # Both learned something: above 10-class chance on clean images.
  assert adversarial["clean_acc"] >= 0.18 and natural["clean_acc"] >= 0.25
  # Thresholds with wide margins below what the calibration runs measured.
  assert adversarial["pgd20_acc"] >= 0.14
  assert natural["pgd20_acc"] <= 0.05
  assert adversarial["pgd20_acc"] - natural["pgd20_acc"] >= 0.10


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_trades_and_mart_are_robust_on_real_cifar10(cifar10_root, tmp_path,
                                                    natural_5k, method):
  result = train.train_and_evaluate(
      _config(cifar10_root,
              method=method,
              epochs=2.0,
              **{
                  "tricks.ard": True,
                  "tricks.prm": True,
                  "tricks.warmup_epochs": 1.0,
                  "data.train_examples": 5_000,
                  "attack.steps": 3,
                  "attack.alpha": 2.5 * (8 / 255) / 3
              }), str(tmp_path / method))
  print(f"{method}: clean {result['clean_acc']:.3f} pgd20 "
        f"{result['pgd20_acc']:.3f} ({result['wall_time_s']:.0f} s); natural:"
        f" clean {natural_5k['clean_acc']:.3f} pgd20 "
        f"{natural_5k['pgd20_acc']:.3f} ({natural_5k['wall_time_s']:.0f} s)")
  assert result["num_eval_images"] == natural_5k["num_eval_images"] == 500
  assert result["clean_acc"] >= 0.18
  # Calibration (2 cores): TRADES +0.106, MART +0.140 over natural.
  assert result["pgd20_acc"] - natural_5k["pgd20_acc"] >= 0.06

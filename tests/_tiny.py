"""The tiny models and configs the tests share (a few seconds of CPU each).

    model = _tiny.model()                    # a 1-block DeiT on 8-px images
    config = _tiny.config(**{"attack.steps": 3})   # the quickstart, shrunk

One definition, so that a test's model is the same wherever it is built
and a compiled step can be shared between test modules.
"""

import orbax.checkpoint as ocp

from configs import quickstart
from vitat_jax import checkpointing
from vitat_jax import models

# A DeiT of one block, width 16, two heads, on 8-px images of 10 classes:
# 2 x 2 patches of 4 px, 5 tokens with the class token.
MODEL = dict(num_classes=10,
             img_size=8,
             patch_size=4,
             embed_dim=16,
             depth=1,
             num_heads=2)
ARCHITECTURE = "deit_tiny_patch16_224"


def model(**overrides):
  """The tiny DeiT (`MODEL`), with `overrides` (e.g. depth=2)."""
  return models.create(ARCHITECTURE, **{**MODEL, **overrides})


def shrink(config):
  """`config` (any of configs/) with the tiny model's shape and 8-px data."""
  config.data.image_size = MODEL["img_size"]
  for name in ("patch_size", "embed_dim", "depth", "num_heads"):
    config.model[name] = MODEL[name]
  return config


def config(**overrides):
  """The quickstart with the tiny model and budget: 320 digits, 2 epochs of
  10 steps, PGD-2, 64 evaluation images (dotted `overrides` applied)."""
  cfg = shrink(quickstart.get_config())
  cfg.data.train_examples = 320
  cfg.batch_size = 32
  cfg.epochs = 2.0
  cfg.tricks.warmup_epochs = 1.0
  cfg.attack.steps = 2
  cfg.eval.num_examples = 64
  cfg.eval.batch_size = 32
  cfg.eval.attacks = ("clean", "pgd20", "cw20")
  cfg.eval.epoch_num_examples = 32
  cfg.log_every_steps = 5
  cfg.checkpoint_every_steps = 7
  cfg.update_from_flattened_dict(overrides)
  return cfg


def newest_checkpoint(workdir: str):
  """(step, state as saved: a dict of arrays) of a run's newest checkpoint,
  restored as orbax wrote it (no target: a test compares it bitwise)."""
  mngr = checkpointing.checkpoint_manager(workdir)
  step = mngr.latest_step()
  restored = mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state

"""Train with an objective of your own, in the library's full training loop.

    python -m examples.custom_objective --workdir=/tmp/cw_at --tiny

registers "cw_at" (PGD-AT whose inner attack climbs the CW margin) and
trains it on the quickstart's digits with checkpoints and evaluations.
Rerunning resumes; `--method=at` in the same workdir is refused (the run
records the method's name). `--tiny`: 8-px images, a one-block ViT, 2 epochs.
"""

import functools

from absl import app
from absl import flags
import jax

from configs import quickstart
from vitat_jax import attacks
from vitat_jax import cli
from vitat_jax import objectives
from vitat_jax import train
from vitat_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run.", required=True)
_TINY = flags.DEFINE_bool("tiny", False, "A tiny model and 2 epochs.")
_METHOD = flags.DEFINE_string("method", "cw_at", "The objective to train.")


def cw_at_loss(params, batch, key, r, eps_scale=1.0, *, model, budget):
  """CE on CW-PGD examples of the frozen params; r (ARD/PRM) is unused."""
  del r
  eps, alpha, steps = budget
  scaled = dict(eps=eps * eps_scale, alpha=alpha * eps_scale, steps=steps)
  attack_key, dropout_key = jax.random.split(key)
  labels = batch["target"].argmax(-1)
  frozen = jax.lax.stop_gradient(params)
  logits_fn = lambda x: model.apply({"params": frozen}, x)
  x_adv = attacks.cw(logits_fn, attack_key, batch["image"], labels, **scaled)
  rngs = {"dropout": dropout_key}
  logits = model.apply({"params": params}, x_adv, train=True, rngs=rngs)
  loss = objectives.soft_cross_entropy(logits, batch["target"])
  return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}


def make_cw_at(config, model):
  """The factory: checks what the objective needs, binds its budget."""
  if config.tricks.ard or config.tricks.prm:
    raise UserError("cw_at has no ARD/PRM: set tricks.ard/prm=False")
  budget = (config.attack.eps, config.attack.alpha, config.attack.steps)
  return functools.partial(cw_at_loss, model=model, budget=budget)


objectives.register("cw_at", make_cw_at)


def get_config(method="cw_at", tiny=False):
  config = quickstart.get_config()
  config.method, config.tricks.ard, config.tricks.prm = method, False, False
  if tiny:  # shrunk as tests/_tiny.py does: 20 steps, 64 test images
    config.data.update(image_size=8, train_examples=320)
    config.model.update(patch_size=4, embed_dim=16, depth=1, num_heads=2)
    config.update(epochs=2.0, batch_size=32, log_every_steps=5)
    config.checkpoint_every_steps, config.attack.steps = 7, 2
    config.eval.update(num_examples=64, batch_size=32, epoch_num_examples=32)
  return config


def main(_):
  try:
    result = train.train_and_evaluate(get_config(_METHOD.value, _TINY.value),
                                      _WORKDIR.value)
  except UserError as e:
    cli.fail(e)
  print(f"{_METHOD.value}: clean {result['clean_acc']:.4f}, "
        f"PGD-20 {result['pgd20_acc']:.4f}")


if __name__ == "__main__":
  app.run(main)

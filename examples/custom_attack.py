"""Evaluate a trained run with an attack of your own.

    python -m examples.custom_attack --workdir=/tmp/cw_at

registers "fgsm" (one signed-gradient step of size eps) as an evaluation
attack and evaluates the run's newest checkpoint as `--mode=eval` does: the
run's own config and weights, clean, FGSM and PGD-20 accuracy on the test
set, robustness.json/md written in the workdir. The attack is keyed by its
name; its result is projected onto the eps-ball and the [0, 1] box.
Run it from the checkout.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from configs import default
from vitat_jax import attacks
from vitat_jax import cli
from vitat_jax import eval_only
from vitat_jax import evaluation
from vitat_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run.", required=True)


def fgsm(logits_fn, key, x, y, *, eps, alpha):
  """Goodfellow et al.'s FGSM: x + eps * sign(grad CE), in the box."""
  del key, alpha  # deterministic, one step of the whole radius
  loss = lambda v: attacks.cross_entropy_per_example(logits_fn(v), y).sum()
  return jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x)), 0.0, 1.0)


evaluation.register_attack("fgsm", fgsm)


def main(_):
  config = default.get_config()  # its `eval` section; the rest is the run's
  config.eval.attacks = ("clean", "fgsm", "pgd20")
  try:
    result = eval_only.evaluate_checkpoint(config, _WORKDIR.value)
  except UserError as e:
    cli.fail(e)
  print(result["table"])
  print(f"fgsm accuracy: {result['fgsm_acc']:.4f}")


if __name__ == "__main__":
  app.run(main)

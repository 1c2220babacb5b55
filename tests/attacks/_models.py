"""Tiny models for the attack tests: fast to compile, 8x8x3 inputs."""

import jax
import jax.numpy as jnp

SHAPE = (8, 8, 3)
NUM_CLASSES = 10
_k1, _k2 = jax.random.split(jax.random.key(42))
W1 = jax.random.normal(_k1, (8 * 8 * 3, 32)) * 0.15
W2 = jax.random.normal(_k2, (32, NUM_CLASSES)) * 0.5


def mlp(x):
  """A fixed random 2-layer MLP."""
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ W1) @ W2


def batch(seed, n=8, edges=True):
  """Random images (with some pixels at the box edges) and the MLP's own
  predictions as labels, so every point starts correctly classified."""
  x = jax.random.uniform(jax.random.key(seed), (n,) + SHAPE)
  if edges:
    x = x.at[:, :2].set(0.0).at[:, -2:].set(1.0)
  return x, jnp.argmax(mlp(x), axis=-1)


def assert_in_ball_and_box(x_adv, x, eps):
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0

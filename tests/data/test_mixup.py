"""Mixup / CutMix: timm's batch-mode semantics on the device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.data import mixup

IMAGES = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
LABELS = jnp.array([0, 1, 2, 3, 4, 5])


@functools.partial(jax.jit, static_argnames=("prob", "switch_prob"))
def _mix(key, prob=0.3, switch_prob=0.5):
  return mixup.mixup_cutmix(key,
                            IMAGES,
                            LABELS,
                            10,
                            prob=prob,
                            switch_prob=switch_prob)


def _run(seed, **kwargs):
  return _mix(jax.random.key(seed), **kwargs)


def test_prob_zero_is_the_identity_with_one_hot_targets():
  images, targets = mixup.mixup_cutmix(jax.random.key(0),
                                       IMAGES,
                                       LABELS,
                                       10,
                                       prob=0.0)
  np.testing.assert_array_equal(images, IMAGES)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(LABELS, 10))


def test_label_smoothing_values():
  targets = mixup.smooth_one_hot(LABELS, 10, 0.1)
  np.testing.assert_allclose(targets[0, 0], 1 - 0.1 + 0.01)
  np.testing.assert_allclose(targets[0, 1], 0.01)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_mixup_blends_each_image_with_the_reversed_batch():
  for seed in range(5):
    images, targets = _run(seed, prob=1.0, switch_prob=0.0)
    lam = float(targets[0, 0])  # label 0 mixed with label 5
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(targets[0, 5], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(images,
                               lam * IMAGES + (1 - lam) * IMAGES[::-1],
                               atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lam():
  pasted_any = False
  for seed in range(5):
    images, targets = _run(seed, prob=1.0, switch_prob=1.0)
    lam = float(targets[0, 0])
    from_reverse = np.all(np.asarray(images) == np.asarray(IMAGES[::-1]),
                          axis=-1)[0]
    from_self = np.all(np.asarray(images) == np.asarray(IMAGES), axis=-1)[0]
    assert np.all(from_reverse | from_self)  # every pixel is copied whole
    np.testing.assert_allclose(from_reverse.mean(), 1 - lam, atol=1e-6)
    # The pasted region is a rectangle.
    rows, cols = np.nonzero(from_reverse & ~from_self)
    if rows.size:
      pasted_any = True
      assert from_reverse[rows.min():rows.max() + 1,
                          cols.min():cols.max() + 1].all()
  assert pasted_any


def test_switching_and_apply_probability_per_batch():
  # The reference's 0.3 / 0.5, over 400 batches.
  _, targets = jax.vmap(_mix)(jax.random.split(jax.random.key(1), 400))
  rate = np.mean(np.asarray(targets[:, 0, 0]) < 1.0 - 1e-6)
  assert 0.2 <= rate <= 0.4
  a = _run(3)
  b = _run(3)
  np.testing.assert_array_equal(a[0], b[0])

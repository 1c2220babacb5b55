"""Mixup / CutMix on the device, per batch, as timm's `Mixup(mode="batch")`.

The reference applies it to PGD-AT batches before the attack: with
probability `prob` a batch is mixed with its reverse, by CutMix (with
probability `switch_prob`, lam ~ Beta(cutmix_alpha, cutmix_alpha), corrected
to the pasted area) or else Mixup (lam ~ Beta(mixup_alpha, mixup_alpha));
targets are lam * y + (1 - lam) * y[::-1], label-smoothed.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0):
  """timm's one-hot with `smoothing`: off = s / C, on = 1 - s + s / C."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key, lam, height: int, width: int):
  """A box of area ~(1 - lam) H W, centre uniform, clipped to the image.

  Returns:
    (bool mask [H, W] of the pasted region, lam corrected to its true area).
  """
  ky, kx = jax.random.split(key)
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut_ratio).astype(jnp.int32)
  cut_w = (width * cut_ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0,
                    height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0,
                    width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  corrected = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  return mask, corrected.astype(jnp.float32)


def mixup_cutmix(key,
                 images,
                 labels,
                 num_classes: int,
                 *,
                 mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0,
                 prob: float = 0.3,
                 switch_prob: float = 0.5,
                 label_smoothing: float = 0.0):
  """Mixed images [B, H, W, C] and soft targets [B, num_classes]."""
  apply_key, switch_key, mix_key, cut_key, box_key = jax.random.split(key, 5)
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
    return images, targets
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(mix_key, max(mixup_alpha, 1e-3),
                            max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(cut_key, max(cutmix_alpha, 1e-3),
                            max(cutmix_alpha, 1e-3))
  box, lam_box = cutmix_box(box_key, lam_cut, images.shape[1], images.shape[2])
  reverse = images[::-1]
  cut = jnp.where(box[None, :, :, None], reverse, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * reverse
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  applied = jax.random.uniform(apply_key) < prob
  lam = jnp.where(applied, lam, 1.0)
  images = jnp.where(applied, jnp.where(use_cutmix, cut, mixed), images)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return images, targets

"""Resampling of pre-trained tensors for other image, patch and window sizes.

NumPy on the host, in PyTorch layout, as the reference code does it:
- position-embedding grid: bilinear, half-pixel centres, no antialiasing
  (torch `F.interpolate(mode="bilinear", align_corners=False)`), the class
  (and distillation) tokens kept apart;
- patch kernel: sum-pooled over equal blocks when the new size divides the
  old one (16x16 -> 4x4), else nearest-neighbour (torch `F.interpolate`'s
  default mode, which the reference falls back to);
- Swin relative-position tables: the (2w-1)x(2w-1) grid of each head
  resized bilinearly like the position embedding.
"""

import numpy as np


def _linear_weights(old: int, new: int) -> np.ndarray:
  """[new, old] interpolation matrix of torch's bilinear, align_corners=False."""
  weights = np.zeros((new, old), np.float64)
  scale = old / new
  for i in range(new):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    low = min(int(np.floor(src)), old - 1)
    high = min(low + 1, old - 1)
    frac = src - low
    weights[i, low] += 1.0 - frac
    weights[i, high] += frac
  return weights


def bilinear_resize(grid: np.ndarray, new_hw) -> np.ndarray:
  """[H, W, C] -> [h, w, C], torch's bilinear with align_corners=False."""
  height, width = grid.shape[:2]
  rows = _linear_weights(height, new_hw[0])
  cols = _linear_weights(width, new_hw[1])
  out = np.einsum("ih,hwc,jw->ijc", rows, grid.astype(np.float64), cols)
  return out.astype(grid.dtype)


def resample_pos_embed(posemb: np.ndarray, num_prefix: int,
                       new_grid: int) -> np.ndarray:
  """[1, prefix + g*g, D] -> [1, prefix + new_grid^2, D]; prefix kept as is."""
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"{grid.shape[0]} position tokens are not a square grid")
  grid = bilinear_resize(grid.reshape(old, old, -1), (new_grid, new_grid))
  return np.concatenate(
      [prefix, grid.reshape(1, new_grid * new_grid, -1)], axis=1)


def resample_patch_kernel(kernel: np.ndarray, new_size: int) -> np.ndarray:
  """[O, I, K, K] -> [O, I, k, k]: sum over k x k blocks, or nearest."""
  out_ch, in_ch, old_h, old_w = kernel.shape
  if old_h % new_size == 0 and old_w % new_size == 0:
    blocks = kernel.reshape(out_ch, in_ch, new_size, old_h // new_size,
                            new_size, old_w // new_size)
    return blocks.sum(axis=(3, 5)).astype(kernel.dtype)
  rows = np.minimum(np.floor(np.arange(new_size) * (old_h / new_size)),
                    old_h - 1).astype(int)
  cols = np.minimum(np.floor(np.arange(new_size) * (old_w / new_size)),
                    old_w - 1).astype(int)
  return kernel[:, :, rows][:, :, :, cols]


def resize_relative_position_table(table: np.ndarray,
                                   new_window: int) -> np.ndarray:
  """[(2w-1)^2, heads] -> [(2v-1)^2, heads] for a window of side v."""
  old = int(round(np.sqrt(table.shape[0])))
  new = 2 * new_window - 1
  grid = bilinear_resize(table.reshape(old, old, -1), (new, new))
  return grid.reshape(new * new, -1)

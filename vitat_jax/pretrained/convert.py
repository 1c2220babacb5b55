"""`load`: a checkpoint file -> params for a model; `export_timm`: back.

The surgery is NumPy on the host, one pass over the model's own parameter
tree (from `jax.eval_shape`, so nothing is computed on the device): every
param is looked up under its timm name, resampled when the model's image,
patch or window size differs, re-initialised when it is a classifier whose
class count changed, and otherwise must match exactly. Every renamed,
resampled, re-initialised or ignored key is logged.
"""

from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitat_jax.pretrained import io
from vitat_jax.pretrained import naming
from vitat_jax.pretrained import resample
from vitat_jax.errors import UserError

# Top-level params that may be re-initialised (classifiers) per family.
_REINIT = {
    "vit": ("head", "head_dist", "pre_logits"),
    "convit": ("head",),
    "swin": ("head",)
}


def _describe(model) -> str:
  fields = ("img_size", "patch_size", "embed_dim", "depth", "depths",
            "num_heads", "window_size", "num_classes")
  parts = [f"{f}={getattr(model, f)}" for f in fields if hasattr(model, f)]
  return f"{type(model).__name__}({', '.join(parts)})"


def _abstract_params(model):
  """The model's parameter shapes, traced without running (or compiling)."""
  images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3),
                                jnp.float32)
  raw_key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(model.init, raw_key, images)["params"]


def _param_shapes(model):
  shapes = _abstract_params(model)
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def _num_prefix_tokens(model, fam: str) -> int:
  if fam == "vit":
    return 2 if model.distilled else 1
  return 0


def load(
    path: str,
    model,
    init_params: Optional[Any] = None,
    format: str = "auto",  # pylint: disable=redefined-builtin
    allow_pickle: bool = False,
    *,
    warn_resampling: bool = False):
  """Params for `model` (a pytree like `model.init(...)["params"]`).

  Args:
    path: a timm/PyTorch `.safetensors` or `.pth`/`.pt` state dict, or a
      Google ViT / big_vision `.npz`.
    model: the module from `models.create`; its image, patch and window sizes
      decide the resampling, its class count whether the head is kept.
    init_params: params to take re-initialised tensors (a new head) from;
      by default the model is initialised with `jax.random.key(0)`.
    format: "auto" (from the file), "safetensors", "torch" or "npz".
    allow_pickle: let `.pth` files hold arbitrary pickled objects. Only for
      files from a trusted source: unpickling can run code.
    warn_resampling: log each resampled tensor as a WARNING, not INFO
      (evaluating a resampled checkpoint is not evaluating timm's network).

  Raises:
    UserError: a missing file, a checkpoint of another family or size, or a
      shape that cannot be mapped (one line, naming the key).
  """
  fam = naming.family(model)
  tensors, fmt = io.read(path, format, allow_pickle)
  if fmt == "npz":
    if fam != "vit":
      raise UserError(f".npz checkpoints are Google ViT files; {path} cannot "
                      f"initialise a {type(model).__name__}")
    tensors = naming.npz_to_timm(tensors, _num_prefix_tokens(model, fam))
  state = naming.normalise_state_dict(tensors, fam)
  shapes = _param_shapes(model)
  reinit_roots = _REINIT[fam]
  used, out, reinit = set(), {}, []
  for flax_path, spec in shapes.items():
    leaf, root = flax_path[-1], flax_path[0]
    key = naming.timm_key(flax_path, fam)
    want = naming.timm_shape(spec.shape, leaf)
    if key not in state:
      if root in reinit_roots:
        reinit.append((flax_path, f"{key} absent from the checkpoint"))
        continue
      raise UserError(
          f"checkpoint {path} has no {key} (needed, shape {want}): it is not "
          f"a checkpoint of {_describe(model)}")
    used.add(key)
    value = np.asarray(state[key])
    _check_values(path, key, value)
    if value.shape != want:
      if root in reinit_roots:
        reinit.append((flax_path, f"{key} {value.shape} -> {want}"))
        continue
      value = _resample(key, value, want, model, fam, path,
                        logging.WARNING if warn_resampling else logging.INFO)
    out[flax_path] = naming.to_flax(value, leaf).astype(spec.dtype)

  unused = sorted(k for k in state if k not in used)
  ignored_roots = sorted(
      {k.split(".")[0] for k in unused if k.split(".")[0] in reinit_roots})
  for root in ignored_roots:
    keys = ", ".join(k for k in unused if k.split(".")[0] == root)
    why = ("the reference drops the in21k pre-logits layer when fine-tuning "
           "to another class count" if root == "pre_logits" else
           "the model has no such classifier layer")
    logging.warning("checkpoint: ignored %s (%s)", keys, why)
  unexpected = [k for k in unused if k.split(".")[0] not in reinit_roots]
  if unexpected:
    more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise UserError(
        f"checkpoint {path} has params the model lacks, e.g. "
        f"{', '.join(unexpected[:3])}{more}: it is not a checkpoint of "
        f"{_describe(model)}")

  if reinit:
    if init_params is None:
      images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
      init_params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_params))
    for flax_path, why in reinit:
      if flax_path not in fresh or fresh[flax_path].shape != shapes[
          flax_path].shape:
        raise UserError(f"init_params lack {'/'.join(flax_path)} of shape "
                        f"{shapes[flax_path].shape}")
      logging.warning("checkpoint: re-initialised %s (%s)", "/".join(flax_path),
                      why)
      fresh_leaf = fresh[flax_path]
      out[flax_path] = (fresh_leaf if isinstance(
          fresh_leaf, jax.ShapeDtypeStruct) else np.asarray(fresh_leaf))
  return flax.traverse_util.unflatten_dict(out)


def _check_values(path: str, key: str, value: np.ndarray) -> None:
  """Weights are floating-point and finite: integer tensors (a quantised
  file) would be cast without a word, NaNs found steps later."""
  if value.dtype.kind in "biu":
    raise UserError(f"checkpoint {path}: {key} holds {value.dtype} values, "
                    "not floating-point weights (a quantised file?): pass the "
                    "float weights")
  finite = np.isfinite(value if value.dtype.kind ==
                       "f" else value.astype(np.float32))
  if not finite.all():
    raise UserError(f"checkpoint {path}: {key} holds {int((~finite).sum())} "
                    "NaN or infinite values: the file is broken; save or copy "
                    "it again")


def check(
    path: str,
    model,
    format: str = "auto",  # pylint: disable=redefined-builtin
    allow_pickle: bool = False,
    *,
    warn_resampling: bool = False) -> None:
  """Raises the UserError `load` would raise, without compiling anything.

  Runs the whole mapping and resampling in NumPy against the model's
  abstract parameter shapes (`jax.eval_shape`), so a wrong checkpoint is
  reported before any JAX work starts.
  """
  load(path,
       model,
       init_params=_abstract_params(model),
       format=format,
       allow_pickle=allow_pickle,
       warn_resampling=warn_resampling)


def _resample(key, value, want, model, fam, path, level):
  """`value` resampled to the shape `want`, or a one-line UserError."""
  if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1]:
    prefix = _num_prefix_tokens(model, fam)
    grid = int(round(np.sqrt(want[1] - prefix)))
    try:
      new = resample.resample_pos_embed(value, prefix, grid)
    except ValueError:
      new = None
    if new is not None and new.shape == want:
      logging.log(
          level, "checkpoint: resampled %s %s -> %s (bilinear, %d prefix "
          "token(s) kept)", key, value.shape, want, prefix)
      return new
  elif key == "patch_embed.proj.weight" and value.shape[:2] == want[:2]:
    new = resample.resample_patch_kernel(value, want[-1])
    how = "sum-pooled" if value.shape[-1] % want[-1] == 0 else "nearest"
    logging.log(level, "checkpoint: resampled %s %s -> %s (%s)", key,
                value.shape, want, how)
    return new
  elif (key.endswith("relative_position_bias_table") and
        value.shape[1:] == want[1:]):
    window = (int(round(np.sqrt(want[0]))) + 1) // 2
    new = resample.resize_relative_position_table(value, window)
    if new.shape == want:
      logging.log(level,
                  "checkpoint: resized %s %s -> %s (bilinear, window %d)", key,
                  value.shape, want, window)
      return new
  raise UserError(
      f"checkpoint {path}: {key} has shape {tuple(value.shape)}, the model "
      f"needs {tuple(want)}: it is not a checkpoint of {_describe(model)}")


def timm_state_dict(params, model) -> dict:
  """Flax params -> {timm key: numpy array in timm layout}."""
  fam = naming.family(model)
  if fam == "vit" and model.has_pre_logits:
    raise UserError("timm has no pre-logits layer any more: export a model "
                    "created with representation_size=None")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {
      naming.timm_key(p, fam):
          np.ascontiguousarray(naming.to_timm(np.asarray(v, np.float32), p[-1]))
      for p, v in flat.items()
  }


def export_timm(params, model, path: str):
  """Writes `params` as a `.safetensors` state dict that timm loads strictly.

  `timm.create_model(name, num_classes=..., img_size=..., patch_size=...,
  <the same keywords given to models.create>)` then
  `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.
  """
  if not path.endswith(".safetensors"):
    raise UserError(f"export_timm writes .safetensors files; got {path}")
  io.write_safetensors(timm_state_dict(params, model),
                       path,
                       metadata={"format": "pt"})
  logging.info("checkpoint: wrote %s for timm", path)

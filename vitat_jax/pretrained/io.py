"""Checkpoint files to flat {name: numpy array} dicts, and back.

`.safetensors` is read and written here without torch (the format is a JSON
header plus raw little-endian buffers). `.pth`/`.pt` needs torch and loads
with `weights_only=True`; arbitrary pickles only when the caller allows it.
`.npz` is read with `allow_pickle=False`.
"""

import json
import os
import struct
import zipfile
from typing import Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from vitat_jax.errors import UserError

FORMATS = ("safetensors", "torch", "npz")

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def detect_format(path: str) -> str:
  """'safetensors', 'torch' or 'npz' from the suffix, else from the bytes."""
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return "safetensors"
  if lower.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return "torch"
  if lower.endswith(".npz"):
    return "npz"
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:2] == b"PK":  # a zip: numpy's npz or torch's zip pickle
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise UserError(f"{path} is a damaged zip file ({e}): is it truncated?"
                      " Copy it again") from None
    return "npz" if all(n.endswith(".npy") for n in names) else "torch"
  if len(head) == 9 and head[8:9] == b"{":
    return "safetensors"
  raise UserError(f"cannot tell the format of {path}: name it .safetensors, "
                  ".pth/.pt or .npz, or pass format=")


def _safetensors_header(path: str, data: bytes) -> Tuple[dict, int]:
  """(the header of a .safetensors file, the offset of its tensors) from
  `data`, the file's bytes (at least its header's)."""
  try:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
  except (struct.error, ValueError) as e:
    raise UserError(f"{path} is not a valid .safetensors file ({e}): is it "
                    "truncated? Copy it again") from None
  if not isinstance(header, dict):
    raise UserError(f"{path} is not a valid .safetensors file (its header is "
                    f"a {type(header).__name__}, not an object)")
  return header, 8 + size


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no torch needed)."""
  with open(path, "rb") as f:
    data = f.read()
  header, start_of_body = _safetensors_header(path, data)
  body = memoryview(data)[start_of_body:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _ST_DTYPES.get(info["dtype"])
      start, end = (int(v) for v in info["data_offsets"])
      shape = tuple(int(v) for v in info["shape"])
    except (TypeError, KeyError, ValueError):
      raise UserError(f"{path} is not a valid .safetensors file (bad header "
                      f"entry for tensor {name!r})") from None
    if dtype is None:
      raise UserError(f"{path}: tensor {name} has unsupported dtype "
                      f"{info['dtype']}")
    if not 0 <= start <= end <= len(body):
      raise UserError(f"{path} is truncated: tensor {name!r} ends at byte "
                      f"{end} of {len(body)}; copy the file again")
    try:
      array = np.frombuffer(body[start:end], dtype).reshape(shape)
    except ValueError:
      raise UserError(
          f"{path} is not a valid .safetensors file (tensor "
          f"{name!r}: {end - start} bytes for shape {shape})") from None
    out[name] = array.copy()
  return out


def _read_safetensors_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
  """The tensors' shapes from a .safetensors header alone."""
  with open(path, "rb") as f:
    head = f.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    data = head + f.read(size)
  header, _ = _safetensors_header(path, data)
  try:
    return {
        name: tuple(int(v) for v in info["shape"])
        for name, info in header.items()
        if name != "__metadata__"
    }
  except (TypeError, KeyError, ValueError):
    raise UserError(f"{path} is not a valid .safetensors file (a bad header "
                    "entry)") from None


def write_safetensors(tensors: Mapping[str, np.ndarray],
                      path: str,
                      metadata: Optional[Mapping[str, str]] = None):
  """Writes numpy arrays to `path` in the safetensors format."""
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])  # tobytes() is C order
    if array.dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name}: dtype {array.dtype} not supported")
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
    header[name] = {
        "dtype": _ST_NAMES[array.dtype],
        "shape": list(array.shape),
        "data_offsets": [offset, offset + len(raw)]
    }
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = dict(metadata)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for raw in chunks:
      f.write(raw)
  os.replace(tmp, path)


def read_torch(path: str, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """A PyTorch state dict (`torch.save`) as numpy arrays; needs torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"reading {path} needs torch (pip install torch), or "
                    "convert it to .safetensors first") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    import pickle  # pylint: disable=g-import-not-at-top
    if not isinstance(e, pickle.UnpicklingError):
      # Not a refused pickle: a damaged or truncated file, or not torch's.
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"{path} cannot be read as a PyTorch file "
                      f"({first[:120]}): is it truncated? Copy it again, or "
                      "check that it is a torch.save file") from None
    if not allow_pickle:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(
          e).__name__
      raise UserError(
          f"{path} is not a plain weights file ({first[:120]}); pass "
          "allow_pickle=True only if you trust its source") from None
    state = torch.load(path, map_location="cpu", weights_only=False)
  return _flatten_torch(state, torch)


def _flatten_torch(state, torch) -> Dict[str, np.ndarray]:
  if isinstance(state, torch.nn.Module):
    state = state.state_dict()
  # Training checkpoints wrap the weights: {"model": ..., "optimizer": ...}.
  for wrapper in ("model", "state_dict"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  out = {}
  for name, value in _walk(state):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:
        out[name] = value.float().numpy().astype(ml_dtypes.bfloat16)
      else:
        out[name] = value.numpy()
  return out


def _walk(tree, prefix=""):
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      yield from _walk(value, f"{prefix}{key}.")
  else:
    yield prefix[:-1], tree


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """All arrays of a .npz file (Google ViT / big_vision checkpoints)."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    raise UserError(f"{path} is not a plain .npz checkpoint ({e})") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path} cannot be read as .npz ({type(e).__name__}: "
                    f"{e}): is it truncated? Copy it again") from None


def read(
    path: str,
    format: str = "auto",  # pylint: disable=redefined-builtin
    allow_pickle: bool = False):
  """(tensors, format) from `path`; format 'auto' guesses from the file."""
  if os.path.isdir(path):
    raise UserError(f"checkpoint {path} is a directory: pass the weights "
                    "file in it")
  if not os.path.isfile(path):
    raise UserError(f"checkpoint {path} does not exist")
  if format == "auto":
    format = detect_format(path)
  if format not in FORMATS:
    raise UserError(f"unknown checkpoint format {format!r}: use one of "
                    f"auto, {', '.join(FORMATS)}")
  reader = {
      "safetensors": read_safetensors,
      "npz": read_npz,
      "torch": lambda p: read_torch(p, allow_pickle)
  }[format]
  return reader(path), format


def read_shapes(
    path: str,
    format: str = "auto",  # pylint: disable=redefined-builtin
    allow_pickle: bool = False
) -> Dict[str, Tuple[int, ...]]:
  """{name: shape} of a checkpoint's tensors (a .safetensors file's header
  alone; other formats are read whole)."""
  if os.path.isfile(path) and (format == "safetensors" or format == "auto" and
                               detect_format(path) == "safetensors"):
    return _read_safetensors_shapes(path)
  tensors, _ = read(path, format, allow_pickle)
  return {name: tuple(value.shape) for name, value in tensors.items()}

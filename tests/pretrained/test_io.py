"""File formats without torch: safetensors reader/writer, npz, detection."""

import ml_dtypes
import numpy as np
import pytest

from vitat_jax.pretrained import io
from vitat_jax.errors import UserError


def test_safetensors_round_trip(tmp_path):
  tensors = {
      "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
      "b": np.array([1, 2, 3], np.int64),
      "c": np.ones((2, 2), ml_dtypes.bfloat16),
      "scalar": np.array(2.5, np.float16)
  }
  path = str(tmp_path / "t.safetensors")
  io.write_safetensors(tensors, path, metadata={"format": "pt"})
  back = io.read_safetensors(path)
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape
    np.testing.assert_array_equal(back[name], value)


def test_safetensors_matches_the_reference_library(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tensors = {
      "x": np.random.RandomState(0).randn(5, 3).astype(np.float32),
      "y": np.arange(7, dtype=np.int32)
  }
  ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path /
                                                         "t.safetensors")
  io.write_safetensors(tensors, ours)
  safetensors_numpy.save_file(tensors, theirs)
  for name, value in safetensors_numpy.load_file(ours).items():
    np.testing.assert_array_equal(value, tensors[name])
  for name, value in io.read_safetensors(theirs).items():
    np.testing.assert_array_equal(value, tensors[name])


def test_format_detection(tmp_path):
  npz = str(tmp_path / "weights")
  np.savez(npz, a=np.zeros(2))
  st = str(tmp_path / "weights_st")
  io.write_safetensors({"a": np.zeros(2, np.float32)}, st)
  assert io.detect_format(npz + ".npz") == "npz"
  assert io.detect_format(st) == "safetensors"
  assert io.detect_format("x.pth") == "torch"
  tensors, fmt = io.read(npz + ".npz")
  assert fmt == "npz" and list(tensors) == ["a"]


def test_missing_and_garbled_files_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    io.read(str(tmp_path / "nope.safetensors"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
  with pytest.raises(UserError, match="not a valid"):
    io.read(str(bad))
  with pytest.raises(UserError, match="unknown checkpoint format"):
    io.read(str(bad), format="onnx")

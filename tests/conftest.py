"""Shared fixtures: the real CIFAR-10 image folder, unpacked once; one XLA
compilation cache for the whole session."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

# One persistent compilation cache per test session, in a fresh temporary
# directory (nothing carries over between sessions): the same tiny train
# step and evaluation, compiled again by every `train_and_evaluate` and every
# `python main.py` child (which inherit the variables), is compiled once and
# then loaded. A loaded executable is the compiled one, so bitwise
# comparisons between runs are unaffected. A cache the caller set is kept.
_SESSION_COMPILE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="vitat-jax-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_COMPILE_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # imported before this file: set it directly
    sys.modules["jax"].config.update("jax_compilation_cache_dir",
                                     _SESSION_COMPILE_CACHE)
    sys.modules["jax"].config.update(
        "jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  del config
  if _SESSION_COMPILE_CACHE:
    shutil.rmtree(_SESSION_COMPILE_CACHE, ignore_errors=True)


_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# `../shared/data` beside the checkout; outside this setup it is absent.
_DEFAULT_CIFAR10_TAR = _REPO_ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
_CACHE_DIR = pathlib.Path("~/.cache/vitat_jax/cifar10-jpeg").expanduser()


def _cifar10_tar() -> pathlib.Path:
  return pathlib.Path(os.environ.get("VITAT_CIFAR10_TAR", _DEFAULT_CIFAR10_TAR))


def _unpack(tar_path: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
  """`cache_dir/cifar10`, unpacked from `tar_path` unless already there.

  A stamp naming the archive's size and mtime marks a finished unpack; the
  tree is unpacked beside it and renamed into place, so an interrupted run
  never leaves a half-filled folder that looks complete.
  """
  stat = tar_path.stat()
  stamp = f"{tar_path.resolve()} {stat.st_size} {stat.st_mtime_ns}\n"
  root, stamp_file = cache_dir / "cifar10", cache_dir / "unpacked.stamp"
  if root.is_dir() and stamp_file.exists() and stamp_file.read_text() == stamp:
    return root
  cache_dir.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=cache_dir, prefix="unpacking-"))
  try:
    # The tar command is ~7x faster than Python's tarfile here.
    subprocess.run(
        ["tar", "-xzf", str(tar_path), "-C",
         str(staging)], check=True)
    stamp_file.unlink(missing_ok=True)
    if root.exists():
      shutil.rmtree(root)
    os.replace(staging / "cifar10", root)
    stamp_file.write_text(stamp)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> pathlib.Path:
  """The real CIFAR-10 as `root/{train,test}/<class>/*.jpg`, or a skip.

  Unpacked once into ~/.cache/vitat_jax/cifar10-jpeg (reused by later runs),
  or into this session's temporary directory when that is not writable. Set
  VITAT_CIFAR10_TAR to use another copy of cifar10-jpeg.tar.gz.
  """
  tar_path = _cifar10_tar()
  if not tar_path.is_file():
    pytest.skip(f"real CIFAR-10 archive {tar_path} is absent (set "
                "VITAT_CIFAR10_TAR to its path to run this test)")
  try:
    return _unpack(tar_path, _CACHE_DIR)
  except OSError:
    return _unpack(tar_path, tmp_path_factory.mktemp("cifar10-jpeg"))

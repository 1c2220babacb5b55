"""The persistent XLA compilation cache: a restarted run loads its
executables instead of compiling them again.

    directory = compilation.enable_cache(config.compilation_cache_dir)
    hits = compilation.cache_hits()   # executables loaded from it so far

A cache directory configured outside the config (`JAX_COMPILATION_CACHE_DIR`)
is kept; an empty `compilation_cache_dir` leaves the cache off.
"""

import os
from typing import Optional

import jax
from jax import monitoring

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = [0]


def _count(event: str, **kwargs) -> None:
  del kwargs
  if event == _HIT_EVENT:
    _hits[0] += 1


monitoring.register_event_listener(_count)


def enable_cache(directory: str) -> Optional[str]:
  """Turns the cache on in `directory` (`~` expanded), unless one is already
  configured; returns the directory in use, or None when it is off.

  Call it before anything is compiled: JAX opens the cache at the first
  compilation.
  """
  configured = jax.config.jax_compilation_cache_dir
  path = choose_directory(configured, directory)
  if path and path != configured:
    jax.config.update("jax_compilation_cache_dir", path)
  return path


def choose_directory(configured: Optional[str],
                     directory: str) -> Optional[str]:
  """The cache directory: one already configured, else `directory`
  (`~` expanded), else None (off)."""
  if configured:
    return configured
  return os.path.expanduser(directory) if directory else None


def cache_hits() -> int:
  """Executables this process has loaded from the cache so far."""
  return _hits[0]


def describe(hits_before: int, directory: Optional[str]) -> str:
  """How the executables compiled since `hits_before` came to be."""
  if cache_hits() > hits_before:
    return f"loaded from the compilation cache in {directory}"
  if directory:
    return f"compiled (kept in the compilation cache in {directory})"
  return "compiled (compilation cache off)"

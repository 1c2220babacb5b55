"""The workdir as a place to write: checks, atomic files and the run lock.

Everything a run writes that a later run reads (config.json, metrics.json,
robustness.json) is written to a temporary file and renamed over the old one,
so a SIGKILL or a full disk never leaves half a file. Only one training run
may write a workdir at a time: `lock` holds an exclusive `flock` on
`<workdir>/run.lock` (which names the host and PID of the holder) for the
whole run. The kernel releases it when the process dies, so a lock left by a
killed run is stale and simply taken over.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Any, Iterator

from vitat_jax.errors import UserError

LOCK_NAME = "run.lock"


def check_writable(workdir: str) -> None:
  """One-line error if `workdir` cannot be created or written (no writes)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {workdir!r} is a file, not a directory: pass "
                    "another --workdir")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"workdir {workdir!r} is under {parent!r}, which is a "
                    "file: pass another --workdir")
  if not os.access(parent, os.W_OK | os.X_OK):
    what = "workdir" if parent == path else "directory above the workdir"
    raise UserError(f"{what} {parent!r} is not writable: fix its permissions"
                    " or pass another --workdir")


def write_json(path: str, value: Any, **kwargs) -> None:
  """`json.dump(value)` to `path` atomically (temp file + rename)."""
  write_text(path, json.dumps(value, **kwargs))


def write_text(path: str, text: str) -> None:
  """`text` to `path` atomically (temp file + rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                             suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def read_json(path: str):
  """The JSON value in `path`, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def holder(workdir: str) -> str:
  """'PID p on host h' from the lock file, or '' if there is none."""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      return f.read().strip()
  except OSError:
    return ""


def is_locked(workdir: str) -> bool:
  """Whether a live process holds the workdir's lock (no writes)."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      return True
    raise
  finally:
    os.close(fd)  # closing drops a lock taken here
  return False


def _refuse(workdir: str):
  who = holder(workdir) or "another process"
  raise UserError(f"workdir {workdir!r} is in use by a running training "
                  f"({who}): wait for it to finish, or pass another --workdir")


def check_unlocked(workdir: str) -> None:
  """One-line error if a live run holds `workdir` (no writes)."""
  if is_locked(workdir):
    _refuse(workdir)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/run.lock` for the block; refuses a live holder.

  A lock file left by a dead process is stale (its flock died with it) and
  is taken over. The file is removed when the block ends.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      _refuse(workdir)
    raise
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n"
             .encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)

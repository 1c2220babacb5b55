"""`python main.py ARGS` whose disk fills at its second checkpoint.

    python tests/_full_disk_main.py ARGS

For machines where the test cannot mount a small tmpfs: orbax's second
`CheckpointManager.save` raises OSError(ENOSPC), as a full disk does.
"""

import errno
import os
import runpy
import sys

import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_save = ocp.CheckpointManager.save
_calls = [0]


def _save_on_a_full_disk(self, *args, **kwargs):
  _calls[0] += 1
  if _calls[0] >= 2:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
  return _save(self, *args, **kwargs)


ocp.CheckpointManager.save = _save_on_a_full_disk
sys.argv = [os.path.join(REPO, "main.py"), *sys.argv[1:]]
sys.path.insert(0, REPO)
runpy.run_path(sys.argv[0], run_name="__main__")

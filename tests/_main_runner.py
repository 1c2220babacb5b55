"""Runs `python main.py ARGS` for many command lines at the cost of one start.

    python tests/_main_runner.py cases.json results.json

cases.json is a list of {"argv": [...], "env": {...}}. JAX and the library
are imported once here; each command line then runs main.py as `__main__`
in a fork of this process (nothing JAX-initialised is shared: no backend is
started before the fork), with its own stdout, stderr and exit status, as a
separate `python main.py ARGS` would. results.json gets, per case,
{"rc", "stdout", "stderr"}.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_LOG_COMPILES", "1")

# pylint: disable=g-import-not-at-top,unused-import
import jax  # noqa: E402,F401
from vitat_jax import eval_only  # noqa: E402,F401
from vitat_jax import train  # noqa: E402,F401
# What main.py imports on the way to most errors, once here rather than in
# every fork: scikit-learn for the digits (0.8 s), torch for .pth weights.
from sklearn import datasets  # noqa: E402,F401
try:
  import torch  # noqa: E402,F401
except ImportError:
  pass


def _child(case, out_path, err_path):
  for fd, path in ((1, out_path), (2, err_path)):
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(target, fd)
    os.close(target)
  os.environ.update(case.get("env") or {})
  sys.argv = [os.path.join(REPO, "main.py"), *case["argv"]]
  code = 0
  try:
    runpy.run_path(sys.argv[0], run_name="__main__")
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def main():
  with open(sys.argv[1]) as f:
    cases = json.load(f)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for index, case in enumerate(cases):
      out_path = os.path.join(tmp, f"{index}.out")
      err_path = os.path.join(tmp, f"{index}.err")
      pid = os.fork()
      if pid == 0:
        _child(case, out_path, err_path)
      _, status = os.waitpid(pid, 0)
      with open(out_path) as f_out, open(err_path) as f_err:
        results.append({
            "rc": os.waitstatus_to_exitcode(status),
            "stdout": f_out.read(),
            "stderr": f_err.read()
        })
  with open(sys.argv[2], "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()

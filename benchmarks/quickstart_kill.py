"""The quickstart SIGKILLed at a fraction of its wall time, then resumed.

    python -m benchmarks.quickstart_kill [--fraction=0.6] [--root=/tmp/qk]

Runs `python main.py --workdir=ROOT/full` uninterrupted (wall time T), then
the same command in ROOT/killed, SIGKILLed at fraction x T, and reruns it.
Both without the compilation cache, so that they start alike. Prints the
step the rerun resumed at (of the total), and whether metrics.json (less its
timings) and metrics.jsonl (less timings) equal the uninterrupted run's.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, kill_after=None):
  command = [
      sys.executable, "main.py", f"--workdir={workdir}",
      "--config.compilation_cache_dir="
  ]
  env = {
      k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"
  }
  start = time.perf_counter()
  proc = subprocess.Popen(command,
                          cwd=REPO,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          text=True)
  try:
    _, err = proc.communicate(timeout=kill_after)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
  return time.perf_counter() - start, proc.returncode, err


def _outputs(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  strip = lambda r: {
      k: v
      for k, v in r.items()
      if not k.endswith("_time_s") and k != "resumed_from_step"
  }
  return strip(metrics), [strip(r) for r in records]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--fraction", type=float, default=0.6)
  parser.add_argument("--root", default="/tmp/quickstart_kill")
  args = parser.parse_args()
  shutil.rmtree(args.root, ignore_errors=True)
  full, killed = (os.path.join(args.root, n) for n in ("full", "killed"))
  wall, code, err = _run(full)
  assert code == 0, err[-3000:]
  print(f"uninterrupted: {wall:.1f} s")
  kill_at = args.fraction * wall
  _, code, _ = _run(killed, kill_after=kill_at)
  print(f"killed at {kill_at:.1f} s ({args.fraction:.0%}): exit {code}")
  rerun_wall, code, err = _run(killed)
  assert code == 0, err[-3000:]
  total = int(re.search(r"(\d+) steps/epoch, (\d+) steps", err).group(2))
  resumed = re.search(r"resuming at step (\d+)", err)
  step = int(resumed.group(1)) if resumed else 0
  same = _outputs(full) == _outputs(killed)
  print(f"rerun: {rerun_wall:.1f} s, resumed at step {step} of {total} "
        f"({step / total:.0%})")
  print(f"metrics identical to the uninterrupted run: {same}")


if __name__ == "__main__":
  main()

"""The scripts of examples/ run as a user types them, from the repo root."""

import math
import os
import re
import subprocess
import sys


def test_mlp_gate_example():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "examples/mlp_gate.py", "--tiny"],
                        cwd=repo,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = re.findall(r"^step (\d+)/8 r=([\d.]+) adversarial loss=(\S+)$",
                     proc.stdout, re.MULTILINE)
  assert [int(step) for step, _, _ in lines] == list(range(1, 9)), proc.stdout
  # r ramps to 1; the loss is finite, near log(10) for 10 random labels.
  assert [float(r) for _, r, _ in lines] == [(i + 1) / 8 for i in range(8)]
  losses = [float(loss) for _, _, loss in lines]
  assert all(math.isfinite(l) and 0 < l < 2 * math.log(10) for l in losses)

"""benchmarks/accelerator.py at toy sizes: every part runs (the training
step in both cases, PyTorch + timm, the input pipeline, AutoAttack against
fra31's) and prints what a device run reports."""

import os
import re
import subprocess
import sys

from benchmarks import accelerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_analytic_count_of_a_vit_b_step():
  """ViT-B/16 at 224 px: 17.56 GMACs per forward pass (the usual figure)
  less the last block's work on the 196 patch tokens, which the head does
  not read (16.5 GMACs), and a PGD-5 AT step is 5 attack iterations
  (forward + input gradient) and one update (forward + activation and
  weight gradients)."""
  case = accelerator.CASES["a"]
  flops = accelerator.analytic_flops(case)
  d, n = case.embed_dim, case.tokens
  # The last block's MLP, projection and attention rows of 196 tokens.
  skipped = 2 * (n - 1) * (d * d + 8 * d * d) + 2 * 2 * (n - 1) * n * d
  assert abs((flops["forward"] + skipped) / 1e9 - 35.1) < 0.2  # 2 x 17.56
  assert abs(flops["forward"] / 1e9 - 32.9) < 0.1
  assert 13 * flops["forward"] < flops["step"] < 14 * flops["forward"]


def test_tiny_runs_every_part_on_the_cpu():
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--tiny"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False)
  out = result.stdout
  assert result.returncode == 0, result.stderr[-3000:]
  assert "backend cpu" in out
  for case in ("(a) ViT-B/16, 224 px, PGD-5 AT", "(b) ViT-B/4, 32 px"):
    assert case in out
  rows = re.findall(
      r"^  (bfloat16|float32)\s+(default|highest)\s+([\d.]+)\s+([\d.]+)\s+"
      r"([\d.]+)%\s+([\d.]+)", out, re.M)
  assert len(rows) == 2, out
  for row in rows:
    assert float(row[2]) > 0 and float(row[5]) > 0.9  # img/s, XLA/analytic
  assert len(re.findall(r"PyTorch \+ timm (fp32|amp-bf16)\s+[\d.]+ img/s",
                        out)) == 4
  assert len(re.findall(r"input pipeline, 1 worker\(s\): \d+ img/s", out)) == 2
  assert re.search(r"AutoAttack \(APGD-CE\).*fra31 [\d.]+ s, [\d.]+x", out)

"""Reports: an evaluation's table and robustness report, comparisons of runs.

    print(report.format_table(result, attack_names))   # the printed table
    report.robustness_markdown(run)                   # robustness.md's text
    report.compare_runs([dir1, dir2], out_dir)       # comparison.{md,png}
    report.make_report([dir1, dir2])     # all of it (`main.py --mode=report`)

Runs are read back with `runs.load_run` (no JAX); plots are `plots.py`'s;
what an evaluation writes is `results.py`'s.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath

from vitat_jax import plots
from vitat_jax import runs as runs_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.attack_names import attack_label
from vitat_jax.errors import UserError
from vitat_jax.runs import Run

COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
# The comparison table's fixed columns; other attacks found follow them.
COMPARISON_ATTACKS = ("clean", "pgd20", "cw20", "pgd100", "aa")
# AutoAttack's checks: a true value (or a count above 0) means a problem.
_AUTOATTACK_CHECKS = ("looks_like_probabilities", "randomized",
                      "zero_gradient_points", "square_beats_white_box",
                      "too_few_classes")

# --------------------------------------------------------------------------
# Robustness report of one run.


def format_table(result: Mapping[str, Any], attack_names) -> str:
  """The evaluation as the table `main.py` prints."""
  rows = [("attack", "accuracy")]
  rows += [(n, f"{100 * result[f'{n}_acc']:.2f}%") for n in attack_names]
  width = max(len(r[0]) for r in rows) + 2
  lines = [f"{a:<{width}}{b:>10}" for a, b in rows]
  lines.insert(1, "-" * (width + 10))
  lines.append(f"({result['num_eval_images']} test images, eps "
               f"{result['eps'] * 255:.1f}/255)")
  return "\n".join(lines)


def _verdict(name: str, value) -> str:
  if value is None:
    return "not run"
  if name in _AUTOATTACK_CHECKS:
    return "WARNING" if value else "ok"
  if isinstance(value, bool):
    return "passed" if value else "FAILED"
  return str(value)


def _eps_text(eps: Optional[float]) -> str:
  return "?" if eps is None else f"{eps * 255:.4g}/255 ({eps:.4g})"


def _seconds(value) -> str:
  return "" if value is None else f"{value:.1f} s"


def robustness_markdown(run: Run) -> str:
  report = run.robustness or {}
  results = run.accuracies()
  total = report.get("num_eval_images", run.metrics.get("num_eval_images"))
  lines = [
      f"# Robustness: {run.title}", "",
      f"L-inf threat model, eps = {_eps_text(run.setting('eps'))}, "
      f"{total} test images. Robust accuracy = the fraction of test "
      "images still classified correctly under the attack.", ""
  ]
  checkpoint = report.get("checkpoint")
  if checkpoint:
    lines += [f"Parameters: {checkpoint}.", ""]
  if report.get("eval_subset"):
    lines += [f"Images: {report['eval_subset']}.", ""]
  weights = report.get("weights", run.metrics.get("weights"))
  if weights in ("ema", "raw"):
    lines += [("Weights: the exponential moving average of the params "
               "(ema.decay)." if weights == "ema" else
               "Weights: the trained params (no averaging)."), ""]
  lines += [
      "| evaluation | accuracy | correct / total | time |",
      "|---|---:|---:|---:|"
  ]
  for name, r in results.items():
    lines.append(f"| {attack_label(name)} | {100 * r['accuracy']:.2f}% | "
                 f"{r['correct']} / {r['total']} | {_seconds(r['time_s'])} |")
  checks = report.get("sanity_checks")
  if checks:
    lines += [
        "", "## Sanity checks", "", "| check | value | verdict |",
        "|---|---|---|"
    ]
    lines += [
        f"| {k} | {json.dumps(v)} | {_verdict(k, v)} |"
        for k, v in checks.items()
    ]
  if report.get("warnings"):
    lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
  log = report.get("autoattack")
  if log and log.get("robust_accuracy"):
    lines += [
        "", "## AutoAttack, attack by attack", "",
        "Each attack runs only on the points every earlier one left "
        "robust; the accuracy is after it and all earlier ones.", "",
        "| after | robust accuracy | time |", "|---|---:|---:|"
    ]
    for name, accuracy in log["robust_accuracy"].items():
      lines.append(f"| {name} | {100 * accuracy:.2f}% | "
                   f"{_seconds(log.get('seconds', {}).get(name))} |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Comparisons of several runs.


def _labels(runs: Sequence[Run]) -> List[str]:
  """Directory names, or longer path tails where they collide."""
  labels = [r.name for r in runs]
  if len(set(labels)) < len(labels):
    labels = [
        os.path.join(*os.path.normpath(r.workdir).split(os.sep)[-2:])
        for r in runs
    ]
  return labels


def config_differences(runs: Sequence[Run]) -> Dict[str, List[Any]]:
  """{dotted key: [value per run]} for keys whose values differ."""
  flats = [workdir_lib.flatten(r.config) for r in runs]
  keys = sorted(set().union(*flats)) if flats else []
  missing = object()
  differences = {}
  for key in keys:
    values = [f.get(key, missing) for f in flats]
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
      differences[key] = [None if v is missing else v for v in values]
  return differences


def _cell(value) -> str:
  if value is None:
    return "—"
  text = value if isinstance(value, str) else json.dumps(value)
  return text.replace("|", "\\|")


def comparison_markdown(runs: Sequence[Run], labels=None) -> str:
  labels = labels or _labels(runs)
  accuracies = [r.accuracies() for r in runs]
  extra = sorted({n for a in accuracies for n in a} - set(COMPARISON_ATTACKS) -
                 {"autoattack"})
  columns = list(COMPARISON_ATTACKS) + extra
  differences = config_differences(runs)
  header = (["run"] + [attack_label(c) for c in columns] +
            ["eps (/255)", "images", "config differences"])
  lines = [
      f"# Comparison of {len(runs)} runs", "",
      "Accuracy in % of the evaluated test images (from each run's "
      "robustness.json, else metrics.json); blank = not measured.", "",
      "| " + " | ".join(header) + " |",
      "|---|" + "---:|" * (len(columns) + 2) + "---|"
  ]
  for i, (run, label, acc) in enumerate(zip(runs, labels, accuracies)):
    cells = [label]
    for column in columns:
      entry = acc.get(column) or (acc.get("autoattack")
                                  if column == "aa" else None)
      cells.append("" if entry is None else f"{100 * entry['accuracy']:.2f}")
    eps = run.setting("eps")
    cells.append("" if eps is None else f"{eps * 255:.3g}")
    totals = {e["total"] for e in acc.values()}
    cells.append(", ".join(str(t) for t in sorted(totals)))
    cells.append("; ".join(
        f"{k}={_cell(v[i])}" for k, v in differences.items()))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Config differences", ""]
  if differences:
    lines += [
        "| key | " + " | ".join(labels) + " |", "|---|" + "---|" * len(runs)
    ]
    lines += [
        f"| {k} | " + " | ".join(_cell(v)
                                 for v in values) + " |"
        for k, values in differences.items()
    ]
  else:
    lines.append("The runs' config.json files are identical (or absent).")
  lines += ["", "## Runs", ""]
  lines += [
      f"- {label}: `{run.workdir}` — {run.title}"
      for label, run in zip(labels, runs)
  ]
  return "\n".join(lines) + "\n"


def compare_runs(workdirs: Sequence[str], out_dir: str) -> Tuple[str, str]:
  """Writes `comparison.md` (one row per run) and `comparison.png` (their
  learning curves) into `out_dir`; returns (markdown path, png path)."""
  runs_lib.check_workdirs(workdirs)
  runs = [runs_lib.load_run(w) for w in workdirs]
  labels = _labels(runs)
  workdir_lib.makedirs(out_dir)
  md_path = workdir_lib.path(out_dir, COMPARISON_MD)
  workdir_lib.write_text(md_path, comparison_markdown(runs, labels))
  png_path = plots.comparison(runs, labels,
                              workdir_lib.path(out_dir, COMPARISON_PNG))
  return md_path, png_path


def default_report_dir(workdirs: Sequence[str]) -> str:
  """`<the runs' common parent>/comparison`, e.g. runs/comparison; runs
  with no common parent below the root get `./comparison` (never
  `/comparison`), and the log says so."""
  parents = [str(epath.Path(workdir_lib.resolve(w)).parent) for w in workdirs]
  if all(map(workdir_lib.is_local, parents)):
    common = os.path.commonpath(parents)
    if common == os.path.dirname(common):  # the root
      out_dir = os.path.join(os.getcwd(), "comparison")
      logging.warning(
          "the runs have no common parent below %s: the comparison goes to "
          "%s (pass --report_dir to choose)", common, out_dir)
      return out_dir
    return os.path.join(common, "comparison")
  return workdir_lib.path(parents[0], "comparison")  # URIs: the first's


def make_report(workdirs: Sequence[str],
                out_dir: Optional[str] = None) -> Tuple[str, str, List[str]]:
  """Plots of each run, then their comparison in `out_dir` (default
  `default_report_dir`). Returns (comparison.md, comparison.png, [the
  runs' plots])."""
  runs_lib.check_workdirs(workdirs)  # before anything is drawn
  for workdir in workdirs:
    runs_lib.load_run(workdir)  # every file readable, before any writes
  out_dir = out_dir or default_report_dir(workdirs)
  if epath.Path(out_dir).exists() and not epath.Path(out_dir).is_dir():
    raise UserError(f"--report_dir {out_dir!r} is a file: pass a directory")
  # Nothing written through a link (a plot file linked elsewhere).
  for workdir in workdirs:
    for name in workdir_lib.PLOTS:
      workdir_lib.check_output(workdir, name, why="--mode=report's plots")
  for name in (COMPARISON_MD, COMPARISON_PNG):
    workdir_lib.check_output(out_dir, name, why="--mode=report")
  plots_written = [p for w in workdirs for p in plots.plot_run(w)]
  md_path, png_path = compare_runs(workdirs, out_dir)
  return md_path, png_path, plots_written

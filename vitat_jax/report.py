"""Reports of finished runs: robustness tables, plots, comparisons.

    report.write_robustness_report(workdir, result)  # robustness.{json,md}
    report.plot_run(workdir)    # learning_curves, schedules, robustness .png
    report.compare_runs([dir1, dir2], out_dir)       # comparison.{md,png}
    report.make_report([dir1, dir2])     # all of it (`main.py --mode=report`)

Everything is read back from the files a run leaves in its workdir
(`config.json`, `metrics.jsonl`, `metrics.json`, `robustness.json`), so a
report can be made for any run, finished or still going, without JAX.
Accuracies come from `robustness.json` when present, else `metrics.json`.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from vitat_jax import metric_writers
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

ROBUSTNESS_JSON = "robustness.json"
ROBUSTNESS_MD = "robustness.md"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
# What `write_robustness_report` and `plot_run` leave in a workdir.
RUN_FILES = (ROBUSTNESS_JSON, ROBUSTNESS_MD, "learning_curves.png",
             "schedules.png", "robustness.png")
# The evaluation attack names of `evaluation.parse_attack` (kept here so
# that reading reports does not import JAX).
_ATTACK_NAME = re.compile(r"^(clean|pgd\d+|cw\d+|aa|autoattack)$")
# The comparison table's fixed columns; other attacks found follow them.
COMPARISON_ATTACKS = ("clean", "pgd20", "cw20", "pgd100", "aa")
METHOD_LABELS = {"at": "PGD-AT", "trades": "TRADES", "mart": "MART",
            "natural": "natural training"}
# AutoAttack's checks: a true value (or a count above 0) means a problem.
_AUTOATTACK_CHECKS = ("looks_like_probabilities", "randomized",
                      "zero_gradient_points", "square_beats_white_box",
                      "too_few_classes")


def attack_label(name: str) -> str:
  """"pgd20" -> "PGD-20", "cw20" -> "CW-20", "aa" -> "AutoAttack"."""
  if name in ("aa", "autoattack"):
    return "AutoAttack"
  match = re.match(r"^(pgd|cw)(\d+)$", name)
  if match:
    return f"{match.group(1).upper()}-{match.group(2)}"
  return name


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                    "restore it, or rerun that run's command to write it "
                    "again") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a {type(value).__name__}, not a JSON "
                    "object: restore it, or rerun that run's command")
  return value


@dataclasses.dataclass
class Run:
  """What a workdir holds; missing files are empty."""
  workdir: str
  config: Dict[str, Any]
  metrics: Dict[str, Any]                # metrics.json
  robustness: Optional[Dict[str, Any]]   # robustness.json
  records: List[Dict[str, Any]]          # metrics.jsonl

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def setting(self, key: str, default=None):
    """model / method / ard / prm / eps: metrics.json, robustness.json,
    else config.json."""
    for source in (self.metrics, self.robustness or {}):
      if source.get(key) is not None:
        return source[key]
    flat = flatten(self.config)
    if key == "eps":
      return flat.get("eval.eps") or flat.get("attack.eps", default)
    return flat.get({"model": "model.name"}.get(key, key), default)

  @property
  def title(self) -> str:
    """"deit_tiny_patch16_224, PGD-AT + ARD + PRM (runs/x)"."""
    method = self.setting("method")
    recipe = METHOD_LABELS.get(method, method or "")
    if method != "natural":
      recipe += "".join(f" + {t.upper()}" for t in ("ard", "prm")
                        if self.setting(t))
    parts = [p for p in (self.setting("model"), recipe) if p]
    return f"{', '.join(parts)} ({self.name})" if parts else self.name

  def accuracies(self) -> Dict[str, Dict[str, Any]]:
    """{attack: {"accuracy", "correct", "total", "time_s"}}, clean first."""
    if self.robustness is not None:
      if "results" in self.robustness:
        return self.robustness["results"]
      return robustness_results(self.robustness)  # a flat evaluation result
    if self.metrics:
      return robustness_results(self.metrics)
    return {}


def check_workdirs(workdirs: Sequence[str]):
  if not workdirs:
    raise UserError("no run directories given: pass --workdirs=DIR1,DIR2")
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      raise UserError(f"run directory {workdir!r} does not exist: pass "
                      "workdirs of earlier `main.py` runs")


def load_run(workdir: str) -> Run:
  check_workdirs([workdir])
  return Run(
      workdir=workdir,
      config=_read_json(os.path.join(workdir, "config.json")) or {},
      metrics=_read_json(os.path.join(workdir, "metrics.json")) or {},
      robustness=_read_json(os.path.join(workdir, ROBUSTNESS_JSON)),
      records=metric_writers.read_jsonl(workdir))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# --------------------------------------------------------------------------
# Robustness report of one run.


def robustness_results(result: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """`evaluate`'s flat result -> {attack: {accuracy, correct, total,
  time_s}}."""
  total = result["num_eval_images"]
  names = [k[:-4] for k in result if k.endswith("_acc")
           and _ATTACK_NAME.match(k[:-4])]
  names.sort(key=lambda n: n != "clean")  # clean first, then as evaluated
  results = {}
  for name in names:
    accuracy = float(result[f"{name}_acc"])
    correct = result.get(f"{name}_correct", round(accuracy * total))
    results[name] = {"accuracy": accuracy, "correct": int(correct),
                     "total": int(total),
                     "time_s": result.get(f"{name}_time_s")}
  return results


def _attack_log_dict(attack_log) -> Dict[str, Any]:
  """AutoAttack's log as plain data (an `AutoAttackResult` or its dict)."""
  if dataclasses.is_dataclass(attack_log):
    attack_log = {f: getattr(attack_log, f) for f in (
        "robust_accuracy", "seconds", "checks", "warnings")}
  keep = ("robust_accuracy", "seconds", "checks", "warnings", "version",
          "num_images", "attacked", "broken", "perturbation")
  return json.loads(json.dumps({k: v for k, v in attack_log.items()
                                if k in keep}, default=float))


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


def write_robustness_report(workdir: str, result: Mapping[str, Any],
                            attack_log=None) -> Tuple[str, str]:
  """Writes `robustness.json` and `robustness.md`; returns their paths.

  Args:
    workdir: the run's directory.
    result: the final evaluation as `train_and_evaluate` returns it:
      `num_eval_images`, `<attack>_acc`, `<attack>_time_s`, `eps`, `model`,
      `method`, `ard`, `prm`, optionally `<attack>_correct` (counts),
      `sanity_checks` ({name: verdict}) and `warnings` (lines). It is saved
      as it is, with `results` ({attack: accuracy, correct, total, time_s}),
      `autoattack`, `sanity_checks` and `warnings` added.
    attack_log: AutoAttack's per-attack log, an `AutoAttackResult` or a dict
      with `robust_accuracy` and `seconds` per attack, `checks`, `warnings`;
      default: `result["autoattack"]` (what `evaluation.evaluate` puts there).
  """
  if attack_log is None:
    attack_log = result.get("autoattack")
  # The result itself (what metrics.json holds), then the same numbers per
  # attack with counts, and the checks.
  report = {k: v for k, v in result.items() if k != "table"}
  report["results"] = robustness_results(result)
  checks = dict(result.get("sanity_checks") or {})
  warnings = list(result.get("warnings") or [])
  if attack_log is not None:
    report["autoattack"] = _attack_log_dict(attack_log)
    checks = {**report["autoattack"].get("checks", {}), **checks}
    warnings += report["autoattack"].get("warnings", [])
  if checks:
    report["sanity_checks"] = checks
  if warnings:
    report["warnings"] = warnings
  os.makedirs(workdir, exist_ok=True)
  json_path = os.path.join(workdir, ROBUSTNESS_JSON)
  workdir_lib.write_json(json_path, report, indent=2, default=_plain_json)
  md_path = os.path.join(workdir, ROBUSTNESS_MD)
  workdir_lib.write_text(md_path, robustness_markdown(load_run(workdir)))
  return json_path, md_path


def _plain_json(value):
  """numpy scalars and arrays in a result, as JSON."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _seconds(value) -> str:
  return "" if value is None else f"{value:.1f} s"


def robustness_markdown(run: Run) -> str:
  report = run.robustness or {}
  results = run.accuracies()
  total = report.get("num_eval_images", run.metrics.get("num_eval_images"))
  lines = [f"# Robustness: {run.title}", "",
           f"L-inf threat model, eps = {_eps_text(run.setting('eps'))}, "
           f"{total} test images. Robust accuracy = the fraction of test "
           "images still classified correctly under the attack.", ""]
  checkpoint = report.get("checkpoint")
  if checkpoint:
    lines += [f"Parameters: {checkpoint}.", ""]
  lines += ["| evaluation | accuracy | correct / total | time |",
            "|---|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {attack_label(name)} | {100 * r['accuracy']:.2f}% | "
                 f"{r['correct']} / {r['total']} | {_seconds(r['time_s'])} |")
  checks = report.get("sanity_checks")
  if checks:
    lines += ["", "## Sanity checks", "", "| check | value | verdict |",
              "|---|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} | {_verdict(k, v)} |"
              for k, v in checks.items()]
  if report.get("warnings"):
    lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
  log = report.get("autoattack")
  if log and log.get("robust_accuracy"):
    lines += ["", "## AutoAttack, attack by attack", "",
              "Each attack runs only on the points every earlier one left "
              "robust; the accuracy is after it and all earlier ones.", "",
              "| after | robust accuracy | time |", "|---|---:|---:|"]
    for name, accuracy in log["robust_accuracy"].items():
      lines.append(f"| {name} | {100 * accuracy:.2f}% | "
                   f"{_seconds(log.get('seconds', {}).get(name))} |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Plots of one run and comparisons of several.


def plot_run(workdir: str) -> List[str]:
  """Writes learning_curves.png, schedules.png and (when the run has a final
  evaluation) robustness.png into `workdir`; returns the paths written."""
  from vitat_jax import plots  # matplotlib only when plotting
  run = load_run(workdir)
  path = lambda name: os.path.join(workdir, name)
  paths = [plots.learning_curves(run, path("learning_curves.png")),
           plots.schedules(run, path("schedules.png"))]
  if run.accuracies():
    paths.append(plots.robustness(run, path("robustness.png")))
  return paths


def _labels(runs: Sequence[Run]) -> List[str]:
  """Directory names, or longer path tails where they collide."""
  labels = [r.name for r in runs]
  if len(set(labels)) < len(labels):
    labels = [os.path.join(*os.path.normpath(r.workdir).split(os.sep)[-2:])
              for r in runs]
  return labels


def config_differences(runs: Sequence[Run]) -> Dict[str, List[Any]]:
  """{dotted key: [value per run]} for keys whose values differ."""
  flats = [flatten(r.config) for r in runs]
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
  extra = sorted({n for a in accuracies for n in a} - set(COMPARISON_ATTACKS)
                 - {"autoattack"})
  columns = list(COMPARISON_ATTACKS) + extra
  differences = config_differences(runs)
  header = (["run"] + [attack_label(c) for c in columns] +
            ["eps (/255)", "images", "config differences"])
  lines = [f"# Comparison of {len(runs)} runs", "",
           "Accuracy in % of the evaluated test images (from each run's "
           "robustness.json, else metrics.json); blank = not measured.", "",
           "| " + " | ".join(header) + " |",
           "|---|" + "---:|" * (len(columns) + 2) + "---|"]
  for i, (run, label, acc) in enumerate(zip(runs, labels, accuracies)):
    cells = [label]
    for column in columns:
      entry = acc.get(column) or (acc.get("autoattack") if column == "aa"
                                  else None)
      cells.append("" if entry is None else f"{100 * entry['accuracy']:.2f}")
    eps = run.setting("eps")
    cells.append("" if eps is None else f"{eps * 255:.3g}")
    totals = {e["total"] for e in acc.values()}
    cells.append(", ".join(str(t) for t in sorted(totals)))
    cells.append("; ".join(f"{k}={_cell(v[i])}"
                           for k, v in differences.items()))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Config differences", ""]
  if differences:
    lines += ["| key | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(_cell(v) for v in values) + " |"
              for k, values in differences.items()]
  else:
    lines.append("The runs' config.json files are identical (or absent).")
  lines += ["", "## Runs", ""]
  lines += [f"- {label}: `{run.workdir}` — {run.title}"
            for label, run in zip(labels, runs)]
  return "\n".join(lines) + "\n"


def compare_runs(workdirs: Sequence[str], out_dir: str) -> Tuple[str, str]:
  """Writes `comparison.md` (one row per run) and `comparison.png` (their
  learning curves) into `out_dir`; returns (markdown path, png path)."""
  from vitat_jax import plots
  check_workdirs(workdirs)
  runs = [load_run(w) for w in workdirs]
  labels = _labels(runs)
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, COMPARISON_MD)
  with open(md_path, "w") as f:
    f.write(comparison_markdown(runs, labels))
  png_path = plots.comparison(runs, labels,
                              os.path.join(out_dir, COMPARISON_PNG))
  return md_path, png_path


def default_report_dir(workdirs: Sequence[str]) -> str:
  """`<the runs' common parent>/comparison`, e.g. runs/comparison."""
  parents = [os.path.dirname(os.path.abspath(w)) for w in workdirs]
  return os.path.join(os.path.commonpath(parents), "comparison")


def make_report(workdirs: Sequence[str], out_dir: Optional[str] = None
                ) -> Tuple[str, str, List[str]]:
  """Plots of each run, then their comparison in `out_dir` (default
  `default_report_dir`). Returns (comparison.md, comparison.png, [the
  runs' plots])."""
  check_workdirs(workdirs)  # before anything is drawn
  for workdir in workdirs:
    load_run(workdir)  # every file readable, before anything is written
  out_dir = out_dir or default_report_dir(workdirs)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--report_dir {out_dir!r} is a file: pass a directory")
  plots_written = [p for w in workdirs for p in plot_run(w)]
  md_path, png_path = compare_runs(workdirs, out_dir)
  return md_path, png_path, plots_written

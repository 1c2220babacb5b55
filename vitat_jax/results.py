"""The results a run writes: metrics.json, robustness.json/.md, AutoAttack's
log in fra31's form and the adversarial examples of an evaluation.

    results.write_results(workdir, result, training=True)
    results.write_autoattack_log(directory, run, norm="Linf")
    results.write_adversarial(directory, {"apgd-ce": {...}}, eps=eps,
                              norm="Linf")

Every file goes through `workdir.py` (atomic writes, local or gs://); the
markdown comes from `report.py`, which reads what is written here.
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
from absl import logging
from etils import epath

from vitat_jax import report as report_lib
from vitat_jax import runs as runs_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError


def write_results(workdir: str, result: Dict[str, Any], *,
                  training: bool) -> None:
  """metrics.json (`training`) and robustness.json/.md, atomically.

  A workdir that cannot take them (read-only, full) costs a warning and
  `result["write_error"]`, never the result: the caller prints the table
  either way.
  """
  written = {k: v for k, v in result.items() if k != "table"}
  try:
    workdir_lib.makedirs(workdir)
    if training:
      workdir_lib.write_json(workdir_lib.path(workdir,
                                              workdir_lib.METRICS_JSON),
                             written,
                             indent=2)
    write_robustness_report(workdir, written)
  except (OSError, UserError) as e:  # UserError: another tool's file there
    result["write_error"] = f"{type(e).__name__}: {e}"
    logging.warning(
        "results not written to %s (%s); the table printed "
        "below is the result", workdir, e)


def _attack_log_dict(attack_log) -> Dict[str, Any]:
  """AutoAttack's log as plain data (an `AutoAttackResult` or its dict)."""
  if dataclasses.is_dataclass(attack_log):
    attack_log = {
        f: getattr(attack_log, f)
        for f in ("robust_accuracy", "seconds", "checks", "warnings")
    }
  keep = ("robust_accuracy", "seconds", "checks", "warnings", "version",
          "num_images", "attacked", "broken", "perturbation")
  return workdir_lib.jsonable({
      k: v for k, v in attack_log.items() if k in keep
  })


def write_robustness_report(workdir: str,
                            result: Mapping[str, Any],
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
  report["results"] = runs_lib.robustness_results(result)
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
  workdir_lib.makedirs(workdir)
  json_path = workdir_lib.path(workdir, workdir_lib.ROBUSTNESS_JSON)
  workdir_lib.write_json(json_path, report, indent=2)
  md_path = workdir_lib.path(workdir, workdir_lib.ROBUSTNESS_MD)
  workdir_lib.write_text(
      md_path, report_lib.robustness_markdown(runs_lib.load_run(workdir)))
  return json_path, md_path


def fra31_log_lines(run: Dict[str, Any], norm: str) -> List[str]:
  """The AutoAttack log in fra31's `log.txt` form (its `logger` lines)."""
  names = list(run["robust_accuracy"])[1:]
  lines = [
      f"using {run['version']} version including {', '.join(names)}.",
      f"initial accuracy: {run['robust_accuracy']['clean']:.2%}"
  ]
  total = 0.0
  for name in names:
    total += run["seconds"][name]
    broken = run["broken"][name]
    lines.append(f"{name} - 1/1 - {broken} out of {run['attacked'][name]} "
                 "successfully perturbed")
    lines.append(f"robust accuracy after {name.upper()}: "
                 f"{run['robust_accuracy'][name]:.2%} (total time "
                 f"{total:.1f} s)")
  p = run["perturbation"]
  lines.append(f"max {norm} perturbation: {p['max']:.5f}, nan in tensor: "
               f"{p['nan']}, max: {p['max_value']:.5f}, min: "
               f"{p['min_value']:.5f}")
  last = names[-1] if names else "clean"
  lines.append(f"robust accuracy: {run['robust_accuracy'][last]:.2%}")
  return lines


def write_autoattack_log(directory: str, run: Dict[str, Any],
                         norm: str) -> None:
  """`<directory>/log.txt`: AutoAttack's log as fra31's `log.txt`."""
  try:
    workdir_lib.makedirs(directory)
    workdir_lib.write_text(
        workdir_lib.path(directory, workdir_lib.AUTOATTACK_LOG),
        "\n".join(fra31_log_lines(run, norm)) + "\n")
  except OSError as e:  # the evaluation's result is still returned
    logging.warning("AutoAttack's log not written to %s: %s", directory,
                    " ".join(str(e).split()))


def write_adversarial(directory: str, saved: Mapping[str, Dict[str, Any]], *,
                      eps: float, norm: str) -> List[str]:
  """`<directory>/adversarial/<attack>.npz` per attack: the `indices`,
  `images` and `labels` it saved (lists of arrays, concatenated), with the
  threat model; returns the paths written."""
  folder = workdir_lib.path(directory, workdir_lib.ADVERSARIAL_DIR)
  written = []
  try:
    workdir_lib.check_output(directory,
                             workdir_lib.ADVERSARIAL_DIR,
                             folder=True,
                             why="eval.save_adversarial")
    workdir_lib.makedirs(folder)
    for name, entry in saved.items():
      path = workdir_lib.path(folder, f"{name}.npz")
      workdir_lib.check_output(folder, f"{name}.npz")
      with epath.Path(path).open("wb") as f:
        np.savez(f,
                 **{
                     k: np.concatenate(v) for k, v in entry.items()
                 },
                 eps=eps,
                 norm=norm)
      written.append(path)
  except (OSError, UserError) as e:
    # The evaluation is done: its table and results still come; only the
    # examples are lost, in one line.
    logging.warning("adversarial examples not saved to %s: %s", folder,
                    " ".join(str(e).split()))
  return written

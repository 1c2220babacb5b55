"""A run read back from its workdir's files, without JAX.

    run = runs.load_run("runs/x")
    run.title, run.setting("eps"), run.accuracies(), run.records

What a run leaves (workdir.py lists the layout) is read as it is: a report
can be made for any run, finished or still going. Accuracies come from
`robustness.json` when present, else `metrics.json`.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from etils import epath

from vitat_jax import attack_names
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

METHOD_LABELS = {
    "at": "PGD-AT",
    "trades": "TRADES",
    "mart": "MART",
    "natural": "natural training"
}


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not epath.Path(path).exists():
    return None
  try:
    value = json.loads(epath.Path(path).read_text())
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
  metrics: Dict[str, Any]  # metrics.json
  robustness: Optional[Dict[str, Any]]  # robustness.json
  records: List[Dict[str, Any]]  # metrics.jsonl

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def setting(self, key: str, default=None):
    """model / method / ard / prm / eps: metrics.json, robustness.json,
    else config.json."""
    for source in (self.metrics, self.robustness or {}):
      if source.get(key) is not None:
        return source[key]
    flat = workdir_lib.flatten(self.config)
    if key == "eps":
      return flat.get("eval.eps") or flat.get("attack.eps", default)
    names = {"model": "model.name", "ard": "tricks.ard", "prm": "tricks.prm"}
    return flat.get(names.get(key, key), default)

  @property
  def title(self) -> str:
    """"deit_tiny_patch16_224, PGD-AT + ARD + PRM (runs/x)"."""
    method = self.setting("method")
    recipe = METHOD_LABELS.get(method, method or "")
    if method != "natural":
      recipe += "".join(
          f" + {t.upper()}" for t in ("ard", "prm") if self.setting(t))
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
    if not epath.Path(workdir).is_dir():
      raise UserError(f"run directory {workdir!r} does not exist: pass "
                      "workdirs of earlier `main.py` runs")


def _shaped(path: str, read):
  """`read()`, or a one-line error naming `path` when its JSON object is not
  shaped as this program writes it (another tool's file, an edited one)."""
  try:
    return read()
  except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
    raise UserError(f"{path} is not shaped as this program writes it "
                    f"({type(e).__name__}: {e}); is it another tool's file? "
                    "Move it away, or rerun that run's command to write it "
                    "again") from None


def _upgraded(config: Dict[str, Any]) -> Dict[str, Any]:
  upgraded = workdir_lib.upgrade_run_config(config)
  workdir_lib.flatten(upgraded)
  return upgraded


def _check_run(run: "Run") -> None:
  """Raises (KeyError, TypeError, ...) where a report would fail on `run`."""
  for entry in run.accuracies().values():
    float(entry["accuracy"])
    int(entry["correct"])
    int(entry["total"])
  for key, kinds in (("eps", (int, float)), ("model", str), ("method", str)):
    value = run.setting(key)
    if value is not None and not isinstance(value, kinds):
      raise TypeError(f"{key} is a {type(value).__name__}")
  run.title  # pylint: disable=pointless-statement


def load_run(workdir: str) -> Run:
  check_workdirs([workdir])
  path = lambda name: workdir_lib.path(workdir, name)
  read = lambda name: _read_json(path(name))
  config = read(workdir_lib.CONFIG_JSON)
  if config:
    config = _shaped(path(workdir_lib.CONFIG_JSON), lambda: _upgraded(config))
  run = Run(workdir=workdir,
            config=config or {},
            metrics=read(workdir_lib.METRICS_JSON) or {},
            robustness=read(workdir_lib.ROBUSTNESS_JSON),
            records=read_jsonl(workdir))
  # Each file alone, so that an error names the one that is wrong.
  alone = {
      workdir_lib.CONFIG_JSON: Run(workdir, run.config, {}, None, []),
      workdir_lib.METRICS_JSON: Run(workdir, {}, run.metrics, None, []),
      workdir_lib.ROBUSTNESS_JSON: Run(workdir, {}, {}, run.robustness, []),
  }
  for name, probe in alone.items():
    _shaped(path(name), lambda probe=probe: _check_run(probe))
  return run


def robustness_results(result: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """`evaluate`'s flat result -> {attack: {accuracy, correct, total,
  time_s}}."""
  total = result["num_eval_images"]
  names = [
      k[:-4]
      for k in result
      if k.endswith("_acc") and attack_names.is_attack_name(k[:-4])
  ]
  names.sort(key=lambda n: n != "clean")  # clean first, then as evaluated
  results = {}
  for name in names:
    accuracy = float(result[f"{name}_acc"])
    correct = result.get(f"{name}_correct", round(accuracy * total))
    results[name] = {
        "accuracy": accuracy,
        "correct": int(correct),
        "total": int(total),
        "time_s": result.get(f"{name}_time_s")
    }
  return results


def read_jsonl(workdir: str) -> List[Dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, in the order written.

  A resumed run's writer has already dropped what the interrupted run wrote
  after its checkpoint (`MetricWriter(purge_step=...)`). A record written
  again at its step with the same keys (a finished run evaluated again)
  replaces its earlier copy. A missing file reads as no records; an
  unreadable (half-written) line is skipped.
  """
  path = workdir_lib.path(workdir, workdir_lib.METRICS_JSONL)
  if not epath.Path(path).exists():
    return []
  records: List[Dict[str, Any]] = []
  for line in epath.Path(path).read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(record, dict) or "step" not in record:
      continue
    copy = next((i for i, r in enumerate(records)
                 if r["step"] == record["step"] and r.keys() == record.keys()),
                None)
    if copy is not None:
      del records[copy:]  # a re-evaluation's records replace the old ones
    records.append(record)
  return records

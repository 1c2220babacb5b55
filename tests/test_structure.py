"""The package's shape: import directions, no cycles, JAX-free entry points.

Imports are read with `ast` (every `import`, at module level or inside a
function), so the checks need nothing but the source.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

from tests import _fake_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vitat_jax")
# The functional core: pure models, attacks and masks know nothing of the
# training, evaluation, data or reporting around them.
CORE = ("vitat_jax.models", "vitat_jax.attacks", "vitat_jax.masks")
OUTSIDE_THE_CORE = ("vitat_jax.train", "vitat_jax.train_step",
                    "vitat_jax.setup", "vitat_jax.checkpointing",
                    "vitat_jax.results", "vitat_jax.pretrained",
                    "vitat_jax.state", "vitat_jax.evaluation",
                    "vitat_jax.eval_only", "vitat_jax.data", "vitat_jax.report",
                    "vitat_jax.runs", "vitat_jax.plots", "vitat_jax.workdir",
                    "vitat_jax.validate", "vitat_jax.objectives",
                    "vitat_jax.metric_writers", "vitat_jax.preemption",
                    "vitat_jax.progress", "vitat_jax.export")
# Modules that read runs and names: never JAX (directly or through others).
JAX_FREE = ("vitat_jax.cli", "vitat_jax.attack_names", "vitat_jax.runs",
            "vitat_jax.report", "vitat_jax.plots", "vitat_jax.workdir",
            "vitat_jax.errors", "vitat_jax.metric_writers", "vitat_jax.results")


def _module_name(path):
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path):
  """The modules `path` imports (`from a import b` counts a.b when it is a
  module of the package, else a)."""
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        names.add(candidate if _is_module(candidate) else node.module)
  return names


def _is_module(name):
  path = os.path.join(REPO, *name.split("."))
  return os.path.isfile(path + ".py") or os.path.isdir(path)


def _graph(root):
  graph = {}
  for folder, _, files in os.walk(root):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(folder, file)
        graph[_module_name(path)] = _imports(path)
  return graph


GRAPH = _graph(PACKAGE)


def _within(name, prefixes):
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
  assert "vitat_jax.train" in GRAPH and "vitat_jax.models.vit" in GRAPH
  assert "vitat_jax.state" in GRAPH["vitat_jax.train"]
  assert "jax" in GRAPH["vitat_jax.train"]


def test_models_attacks_and_masks_import_nothing_from_the_training_side():
  wrong = {(module, imported) for module, imports in GRAPH.items()
           if _within(module, CORE) for imported in imports
           if _within(imported, OUTSIDE_THE_CORE)}
  assert not wrong


def test_configs_import_nothing_from_the_package():
  graph = _graph(os.path.join(REPO, "configs"))
  assert graph  # the configs were read
  wrong = {(m, i)
           for m, imports in graph.items()
           for i in imports
           if _within(i, ("vitat_jax",))}
  assert not wrong


def test_the_library_imports_nothing_of_the_checkout():
  """An installed vitat_jax has no configs/, tests/, benchmarks/, scripts/,
  examples/ or main.py beside it (pyproject.toml installs the package alone)."""
  checkout = ("configs", "tests", "benchmarks", "scripts", "examples", "main")
  wrong = {(m, i)
           for m, imports in GRAPH.items()
           for i in imports
           if _within(i, checkout)}
  assert not wrong


def _requirements(path):
  lines = (line.split("#")[0].strip() for line in open(path))
  return [line for line in lines if line and not line.startswith("-r")]


def test_pyproject_lists_the_requirement_files():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["dependencies"] == _requirements(
      os.path.join(REPO, "requirements.txt"))
  assert project["optional-dependencies"]["dev"] == _requirements(
      os.path.join(REPO, "requirements-dev.txt"))
  import vitat_jax  # pylint: disable=g-import-not-at-top
  assert project["version"] == vitat_jax.__version__


def test_the_package_init_files_import_nothing_eagerly():
  assert not {i for i in GRAPH["vitat_jax"] if _within(i, ("vitat_jax",))}


def test_no_import_cycle_in_the_package():
  internal = {
      m: {i for i in imports if i in GRAPH and i != m}
      for m, imports in GRAPH.items()
  }
  # A package's __init__ re-exporting its own modules is not a cycle.
  for m in internal:
    internal[m] = {i for i in internal[m] if not m.startswith(i + ".")}
  state = {}

  def visit(module, path):
    state[module] = "open"
    for imported in sorted(internal[module]):
      if state.get(imported) == "open":
        cycle = path[path.index(imported):] + [imported]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if imported not in state:
        visit(imported, path + [imported])
    state[module] = "done"

  for module in sorted(internal):
    if module not in state:
      visit(module, [module])


def test_modules_that_read_runs_never_reach_jax():
  for start in JAX_FREE:
    seen, todo = set(), [start]
    while todo:
      module = todo.pop()
      if module in seen:
        continue
      seen.add(module)
      for imported in GRAPH.get(module, ()):
        assert not _within(imported,
                           ("jax", "flax", "optax", "orbax")), (start, module,
                                                                imported)
        if imported in GRAPH:
          todo.append(imported)


def _reaches(start, targets):
  """Whether `start` imports any of `targets`, directly or through the
  package's other modules; the first path found, else None."""
  seen, todo = set(), [(start, [start])]
  while todo:
    module, path = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    for imported in GRAPH.get(module, ()):
      if _within(imported, targets):
        return path + [imported]
      if imported in GRAPH:
        todo.append((imported, path + [imported]))
  return None


def test_the_jitted_step_and_the_train_state_know_nothing_of_files():
  # The step and its state are JAX, Flax and optax only: run checkpoints
  # (orbax, etils) are checkpointing.py's.
  for start in ("vitat_jax.train_step", "vitat_jax.state"):
    assert _reaches(start, ("orbax", "etils", "vitat_jax.checkpointing",
                            "vitat_jax.workdir")) is None, start


def test_parallel_imports_no_attack():
  assert _reaches("vitat_jax.parallel", ("vitat_jax.attacks",)) is None


def test_train_eval_and_export_share_one_prologue():
  for module in ("vitat_jax.train", "vitat_jax.eval_only", "vitat_jax.export"):
    assert "vitat_jax.setup" in GRAPH[module], module
    # The prologue's pieces are setup's: nobody else loads data or builds
    # the optimizer for a run.
    assert "vitat_jax.data" not in GRAPH[module], module
    assert "vitat_jax.optim" not in GRAPH[module], module
    assert "vitat_jax.validate" not in GRAPH[module], module


def _source(module):
  path = os.path.join(REPO, *module.split(".")) + ".py"
  return open(path).read()


@pytest.mark.parametrize("fragment", [
    "unknown optimizer", "unknown lr schedule", "unknown method",
    "unknown dataset", "keep_checkpoints=", "data.std", "data.root is empty",
    "data.tfds_name is empty", "eval.eps={eval_eps} must be in (0, 1]",
    "unknown eval.protocol"
])
def test_a_config_rule_is_written_in_one_place(fragment):
  """Each config rule's message lives in one module: its one owner."""
  owners = [
      m for m in GRAPH
      if os.path.isfile(os.path.join(REPO, *m.split(".")) +
                        ".py") and fragment in _source(m)
  ]
  assert len(owners) == 1, (fragment, owners)


def test_train_py_stays_short():
  lines = _source("vitat_jax.train").count("\n")
  assert lines < 300, lines


_PROBE = """
import json, runpy, sys
sys.argv = ["main.py", *json.loads(sys.argv[1])]
code = 0
try:
  runpy.run_path("main.py", run_name="__main__")
except SystemExit as e:
  code = e.code or 0
print(json.dumps({"code": code, "jax": "jax" in sys.modules}))
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["--mode=report"],
             [
                 "--mode=config", "--config=configs/cifar10.py:ard=True",
                 "--config.optim.lr=0.05"
             ]])
def test_help_report_and_config_do_not_import_jax(argv, tmp_path):
  if argv == ["--mode=report"]:
    _fake_runs.make_run(str(tmp_path / "run"))
    argv = argv + [
        f"--workdirs={tmp_path / 'run'}", f"--report_dir={tmp_path / 'report'}"
    ]
  proc = subprocess.run([sys.executable, "-c", _PROBE,
                         json.dumps(argv)],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  outcome = json.loads(proc.stdout.strip().splitlines()[-1])
  assert outcome == {"code": 0, "jax": False}, proc.stderr[-2000:]
  if "--mode=report" in argv:
    assert (tmp_path / "report" / "comparison.md").exists()


FORMATTED = ("main.py", "vitat_jax", "configs", "tests", "scripts",
             "benchmarks", "examples")


def test_the_code_is_formatted_with_yapf():
  """One formatter (pyproject.toml's settings): `python -m yapf -i -r -p .`
  fixes what this finds."""
  proc = subprocess.run([
      sys.executable, "-m", "yapf", "--diff", "--recursive", "--parallel",
      *FORMATTED
  ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=300)
  assert proc.returncode == 0 and not proc.stdout, (
      "not formatted; run `python -m yapf -i -r -p .`:\n" +
      (proc.stdout + proc.stderr)[-3000:])

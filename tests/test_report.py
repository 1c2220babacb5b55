"""Reports from fake workdirs: robustness files, plots, run comparison."""

import json
import os

from PIL import Image
import pytest

from tests import _fake_runs
from vitat_jax import plots
from vitat_jax import report
from vitat_jax import results as results_lib
from vitat_jax import runs as runs_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

AUTOATTACK_LOG = {
    "robust_accuracy": {
        "clean": 0.75,
        "apgd-ce": 0.43,
        "apgd-t": 0.412,
        "fab-t": 0.411,
        "square": 0.41
    },
    "seconds": {
        "apgd-ce": 30.2,
        "apgd-t": 120.0,
        "fab-t": 80.1,
        "square": 200.0
    },
    "checks": {
        "looks_like_probabilities": False,
        "randomized": False,
        "zero_gradient_points": 0,
        "square_beats_white_box": False,
        "too_few_classes": False
    },
    "warnings": [],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three finished runs (one with robustness.json) and one in progress."""
  root = tmp_path_factory.mktemp("runs")
  dirs = {
      name: str(root / name)
      for name in ("at_ard_prm", "at_lr005", "natural", "running")
  }
  result = _fake_runs.make_run(dirs["at_ard_prm"],
                               attacks=("clean", "pgd20", "cw20", "aa"))
  results_lib.write_robustness_report(
      dirs["at_ard_prm"], dict(result, sanity_checks={"randomized": False}),
      AUTOATTACK_LOG)
  _fake_runs.make_run(dirs["at_lr005"],
                      lr=0.05,
                      ard=False,
                      prm=False,
                      seed=1,
                      attacks=("clean", "pgd20", "cw20", "pgd100"))
  _fake_runs.make_run(dirs["natural"],
                      method="natural",
                      ard=False,
                      prm=False,
                      seed=2,
                      epoch_eval=False)
  _fake_runs.make_run(dirs["running"], epochs=4, final=False)
  return dirs


def _assert_readable_png(path):
  assert os.path.getsize(path) > 10_000, path
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] >= 600 and image.size[1] >= 400, image.size


def test_robustness_report_has_counts_times_and_checks(runs):
  workdir = runs["at_ard_prm"]
  with open(os.path.join(workdir, "robustness.json")) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert list(saved["results"]) == ["clean", "pgd20", "cw20", "aa"]
  for name, entry in saved["results"].items():
    assert entry["accuracy"] == metrics[f"{name}_acc"]
    assert entry["total"] == metrics["num_eval_images"] == 1000
    assert entry["correct"] == round(entry["accuracy"] * 1000)
    assert entry["time_s"] == metrics[f"{name}_time_s"]
  assert saved["eps"] == pytest.approx(8 / 255)
  for key in ("model", "method", "ard", "prm", "clean_acc", "pgd20_acc"):
    assert saved[key] == metrics[key]  # the flat result is kept as it is
  assert saved["sanity_checks"]["zero_gradient_points"] == 0
  assert saved["autoattack"]["robust_accuracy"]["square"] == 0.41
  with open(os.path.join(workdir, "robustness.md")) as f:
    markdown = f.read()
  assert "PGD-AT + ARD + PRM" in markdown and "eps = 8/255" in markdown
  assert "| PGD-20 | 45.00% | 450 / 1000 | 20.0 s |" in markdown
  assert "| randomized | false | ok |" in markdown
  assert "| square | 41.00% | 200.0 s |" in markdown


def test_counts_given_by_the_evaluation_win(tmp_path):
  result = {
      "num_eval_images": 3,
      "clean_acc": 2 / 3,
      "clean_correct": 2,
      "pgd20_acc": 1 / 3,
      "eps": 8 / 255,
      "train_time_s": 5.0
  }
  results_lib.write_robustness_report(str(tmp_path), result)
  with open(tmp_path / "robustness.json") as f:
    results = json.load(f)["results"]
  assert results == {
      "clean": {
          "accuracy": 2 / 3,
          "correct": 2,
          "total": 3,
          "time_s": None
      },
      "pgd20": {
          "accuracy": 1 / 3,
          "correct": 1,
          "total": 3,
          "time_s": None
      }
  }


def test_autoattack_log_is_taken_from_the_result(tmp_path):
  result = {
      "num_eval_images": 1000,
      "clean_acc": 0.75,
      "aa_acc": 0.41,
      "aa_time_s": 430.3,
      "eps": 8 / 255,
      "model": "deit_tiny",
      "checkpoint": "runs/x/checkpoints step 800",
      "autoattack": dict(AUTOATTACK_LOG, version="standard")
  }
  results_lib.write_robustness_report(str(tmp_path), result)
  with open(tmp_path / "robustness.json") as f:
    saved = json.load(f)
  assert saved["autoattack"]["robust_accuracy"] == AUTOATTACK_LOG[
      "robust_accuracy"]
  assert saved["sanity_checks"] == AUTOATTACK_LOG["checks"]
  assert saved["checkpoint"] == "runs/x/checkpoints step 800"
  markdown = (tmp_path / "robustness.md").read_text()
  assert "| AutoAttack | 41.00% | 410 / 1000 | 430.3 s |" in markdown
  assert "| apgd-t | 41.20% | 120.0 s |" in markdown


def test_a_flat_robustness_json_still_reads(tmp_path):
  """As `--mode=eval` wrote it before write_robustness_report existed."""
  with open(tmp_path / "robustness.json", "w") as f:
    json.dump(
        {
            "num_eval_images": 10,
            "clean_acc": 0.9,
            "pgd20_acc": 0.5,
            "eps": 8 / 255,
            "model": "m"
        }, f)
  run = runs_lib.load_run(str(tmp_path))
  assert run.accuracies()["pgd20"] == {
      "accuracy": 0.5,
      "correct": 5,
      "total": 10,
      "time_s": None
  }


def test_plot_run_writes_readable_pngs(runs):
  paths = plots.plot_run(runs["at_ard_prm"])
  assert [os.path.basename(p) for p in paths
         ] == ["learning_curves.png", "schedules.png", "robustness.png"]
  for path in paths:
    assert os.path.dirname(path) == runs["at_ard_prm"]
    _assert_readable_png(path)


def test_plot_run_of_a_run_still_training(runs):
  paths = plots.plot_run(runs["running"])
  assert [os.path.basename(p) for p in paths
         ] == ["learning_curves.png", "schedules.png"]
  for path in paths:
    _assert_readable_png(path)


def _table(markdown):
  """{run: {column: cell}} of the first markdown table."""
  lines = [l for l in markdown.splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    if line.startswith("| key"):
      break
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    rows[cells[0]] = dict(zip(header, cells))
  return rows


def test_compare_runs_table_matches_each_run(runs, tmp_path):
  names = ["at_ard_prm", "at_lr005", "natural"]
  md_path, png_path = report.compare_runs([runs[n] for n in names],
                                          str(tmp_path))
  _assert_readable_png(png_path)
  with open(md_path) as f:
    table = _table(f.read())
  assert list(table) == names
  columns = {
      "clean": "clean",
      "pgd20": "PGD-20",
      "cw20": "CW-20",
      "pgd100": "PGD-100",
      "aa": "AutoAttack"
  }
  for name in names:
    source = os.path.join(runs[name], "robustness.json")
    if os.path.exists(source):
      with open(source) as f:
        results = json.load(f)["results"]
      expected = {k: v["accuracy"] for k, v in results.items()}
    else:
      with open(os.path.join(runs[name], "metrics.json")) as f:
        metrics = json.load(f)
      expected = {
          k: metrics[f"{k}_acc"] for k in columns if f"{k}_acc" in metrics
      }
    for attack, column in columns.items():
      cell = table[name][column]
      if attack in expected:
        assert cell == f"{100 * expected[attack]:.2f}", (name, attack)
      else:
        assert cell == "", (name, attack)
    assert table[name]["images"] == "1000"
    assert table[name]["eps (/255)"] == "8"
  differences = table["at_lr005"]["config differences"]
  assert differences == (
      "method=at; optim.lr=0.05; tricks.ard=false; tricks.prm=false")


def test_config_differences_flatten_nested_keys(runs):
  loaded = [runs_lib.load_run(runs[n]) for n in ("at_ard_prm", "natural")]
  assert report.config_differences(loaded) == {
      "method": ["at", "natural"],
      "tricks.ard": [True, False],
      "tricks.prm": [True, False]
  }
  assert workdir_lib.flatten({
      "a": {
          "b": {
              "c": 1
          }
      },
      "d": [1, 2]
  }) == {
      "a.b.c": 1,
      "d": [1, 2]
  }


def test_make_report_refuses_a_missing_directory_before_drawing(runs, tmp_path):
  with pytest.raises(UserError, match="'.*nope' does not exist"):
    report.make_report([runs["running"], str(tmp_path / "nope")], str(tmp_path))
  assert not os.listdir(tmp_path)
  with pytest.raises(UserError, match="no run directories"):
    report.make_report([])


def test_default_report_dir_is_beside_the_runs():
  assert report.default_report_dir(["runs/a", "runs/b"
                                   ]) == os.path.abspath("runs/comparison")

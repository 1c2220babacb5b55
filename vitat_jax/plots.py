"""The figures of a run and of a comparison: matplotlib, off-screen, PNG.

`plot_run(workdir)` draws a run's figures into its workdir; the other
functions take `runs.Run`s (the files of a workdir, already read) and write
one PNG each. Figures are built with `matplotlib.figure.Figure`
directly, so no display, backend choice or pyplot state is involved.
"""

import math
import os
from typing import List, Optional, Sequence

from etils import epath
from matplotlib.figure import Figure

from vitat_jax import runs as runs_lib
from vitat_jax import workdir as workdir_lib
from vitat_jax.attack_names import attack_label
from vitat_jax.errors import UserError

DPI = 110
_ATTACK_COLORS = {
    "clean": "tab:blue",
    "pgd20": "tab:red",
    "cw20": "tab:orange",
    "pgd100": "tab:purple",
    "aa": "tab:brown",
    "autoattack": "tab:brown"
}
_EXTRA_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_NOTE = dict(ha="center",
             va="center",
             fontsize=9,
             color="0.3",
             bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))


def _color(name: str, index: int = 0) -> str:
  return _ATTACK_COLORS.get(name, _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def _figure(ncols: int, title: str, width: float = 5.4, height: float = 4.6):
  fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  fig.suptitle(title, fontsize=13, fontweight="bold")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def _save(fig, path: str) -> str:
  """Saves `fig` as PNG to `path` (a local path or a URI), never through a
  symbolic link (it would write wherever the link points)."""
  if workdir_lib.is_local(path) and os.path.islink(path):
    raise UserError(f"{path} is a symbolic link: a plot is not written "
                    "through it; remove the link")
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png")
  return path


def _series(records, key: str):
  """(epochs, values) of the records holding a finite `key`."""
  points = [(r["epoch"], r[key]) for r in records if "epoch" in r and
            isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return [p[0] for p in points], [p[1] for p in points]


def _test_attacks(records) -> List[str]:
  names = []
  for r in records:
    for k in r:
      if k.startswith("test_") and k.endswith("_acc") and k[5:-4] not in names:
        names.append(k[5:-4])
  return sorted(names, key=lambda n: n != "clean")


def _last_epoch(run) -> Optional[float]:
  epochs = [r["epoch"] for r in run.records if "epoch" in r]
  if epochs:
    return max(epochs)
  return run.config.get("epochs")


def _train_accuracy_keys(run):
  """[(record key, label)]: TRADES logs clean and adversarial accuracy,
  PGD-AT and MART the adversarial one, natural training the clean one."""
  adversarial = ("train_adversarial_accuracy", "train, on its training attack")
  if any(adversarial[0] in r for r in run.records):
    return [("train_accuracy", "train, clean batches"), adversarial]
  if run.setting("method") == "natural":
    return [("train_accuracy", "train, clean batches")]
  return [("train_accuracy", adversarial[1])]


def _note(ax, text: str, y: float = 0.5):
  ax.text(0.5, y, text, transform=ax.transAxes, **_NOTE)


def _epoch_axis(ax, last_epoch: Optional[float]):
  ax.set_xlabel("epoch")
  if last_epoch:
    ax.set_xlim(0, last_epoch * 1.04)


def _accuracy_axes(ax, title: str, last_epoch: Optional[float]):
  ax.set_title(title)
  _epoch_axis(ax, last_epoch)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)


def learning_curves(run, path: str) -> str:
  """Accuracy per epoch (per-epoch test subset, train batches, final
  evaluation) and the training loss."""
  fig, (ax_acc, ax_loss) = _figure(2, run.title)
  test = [r for r in run.records if any(k.startswith("test_") for k in r)]
  train = [r for r in run.records if "train_loss" in r]
  for i, name in enumerate(_test_attacks(test)):
    epochs, values = _series(test, f"test_{name}_acc")
    ax_acc.plot(epochs, [100 * v for v in values],
                marker="o",
                markersize=3,
                color=_color(name, i),
                label=f"test, {attack_label(name)}")
  for (key, label), style in zip(_train_accuracy_keys(run), ("--", ":")):
    epochs, values = _series(train, key)
    if epochs:
      ax_acc.plot(epochs, [100 * v for v in values],
                  linestyle=style,
                  color="tab:green",
                  label=label)
  final_epoch = _last_epoch(run)
  for i, (name, entry) in enumerate(run.accuracies().items()):
    if final_epoch is not None:
      ax_acc.plot([final_epoch], [100 * entry["accuracy"]],
                  marker="*",
                  markersize=13,
                  linestyle="none",
                  color=_color(name, i),
                  markeredgecolor="black",
                  markeredgewidth=0.6,
                  clip_on=False,
                  label=f"final {attack_label(name)}: "
                  f"{100 * entry['accuracy']:.1f}% "
                  f"({entry['total']} images)")
  subset = [r.get("test_num_eval_images") for r in test]
  subset_text = f" (test subset: {subset[-1]} images)" if subset[-1:] and \
      subset[-1] else ""
  _accuracy_axes(ax_acc, "accuracy" + subset_text, final_epoch)
  if not test:
    _note(ax_acc, "no per-epoch test evaluation\n"
          "(eval.epoch_num_examples = 0)",
          y=0.06)
  if ax_acc.get_legend_handles_labels()[0]:
    ax_acc.legend(fontsize=8, loc="best")
  else:
    _note(ax_acc, "no accuracy recorded yet")
  epochs, values = _series(train, "train_loss")
  ax_loss.plot(epochs, values, color="tab:green", marker=".")
  ax_loss.set_title("training loss (mean over each logging window)")
  _epoch_axis(ax_loss, final_epoch)
  method = runs_lib.METHOD_LABELS.get(run.setting("method"))
  ax_loss.set_ylabel(f"{method} loss (nats)" if method else "loss (nats)")
  if not epochs:
    _note(ax_loss, "no training records yet")
  return _save(fig, path)


def schedules(run, path: str) -> str:
  """Learning rate, the ARD/PRM warm-up value r(t), the gradient norm."""
  fig, (ax_lr, ax_r, ax_grad) = _figure(3, run.title, width=4.6)
  train = [r for r in run.records if "train_loss" in r]
  epochs, lr = _series(train, "train_lr")
  ax_lr.plot(epochs, lr, color="tab:blue", marker=".")
  positive = [v for v in lr if v > 0]
  if positive and max(positive) / min(positive) > 10:
    ax_lr.set_yscale("log")
    levels = sorted({float(f"{v:.2g}") for v in positive})
    if len(levels) <= 6:  # a piecewise schedule: label its levels
      ax_lr.set_yticks(levels, [f"{v:g}" for v in levels])
      ax_lr.set_yticks([], minor=True)
  ax_lr.set_title("learning rate" +
                  (" (log scale)" if ax_lr.get_yscale() == "log" else ""))
  ax_lr.set_ylabel("learning rate (mean over logging window)")

  epochs, r = _series(train, "train_r")
  used = (run.setting("ard") or run.setting("prm")) and (run.setting("method")
                                                         != "natural")
  ax_r.plot(epochs,
            r,
            color="tab:purple",
            marker=".",
            label="r(t)",
            alpha=1.0 if used else 0.35)
  epochs_eps, eps = _series(train, "train_eps")
  target = workdir_lib.flatten(run.config).get("attack.eps")
  if eps and target:
    ax_r.plot(epochs_eps, [v / target for v in eps],
              color="tab:orange",
              marker=".",
              label="attack eps(t) / attack.eps")
  ax_r.set_ylim(-0.05, 1.05)
  ax_r.set_title("warm-ups: ARD / PRM r(t)" + (", attack eps" if eps else ""))
  ax_r.set_ylabel("r(t): ARD keep prob., PRM unmasked fraction")
  warmup = workdir_lib.flatten(run.config).get("tricks.warmup_epochs")
  if warmup:
    ax_r.axvline(warmup,
                 color="0.4",
                 linestyle=":",
                 label=f"end of warm-up (n_w = {warmup:g} epochs)")
  if warmup or eps:
    ax_r.legend(fontsize=8, loc="lower right")
  if not used and not eps:
    _note(ax_r, "ARD and PRM are off in this run:\nr(t) is not used", y=0.3)

  epochs, grad = _series(train, "train_grad_norm")
  ax_grad.plot(epochs,
               grad,
               color="tab:red",
               marker=".",
               label="mean over logging window")
  clip = workdir_lib.flatten(run.config).get("optim.grad_clip")
  if clip:
    ax_grad.axhline(clip,
                    color="0.4",
                    linestyle="--",
                    label=f"clipping threshold ({clip:g})")
  ax_grad.set_ylim(bottom=0)
  ax_grad.set_title("gradient norm")
  ax_grad.set_ylabel("global gradient norm (before clipping)")
  ax_grad.legend(fontsize=8, loc="best")
  for ax in (ax_lr, ax_r, ax_grad):
    _epoch_axis(ax, _last_epoch(run))
    if not epochs:
      _note(ax, "no training records yet")
  return _save(fig, path)


def robustness(run, path: str) -> str:
  """Bars: clean and robust accuracy per attack, with counts; AutoAttack's
  attack-by-attack accuracy beside them when its log is present."""
  accuracies = run.accuracies()
  names = list(accuracies)
  labels = [attack_label(n) for n in names]
  heights = [100 * accuracies[n]["accuracy"] for n in names]
  texts = [
      f"{h:.2f}%\n{accuracies[n]['correct']}/{accuracies[n]['total']}"
      for h, n in zip(heights, names)
  ]
  colors = [_color(n, i) for i, n in enumerate(names)]
  log = (run.robustness or {}).get("autoattack") or {}
  steps = [
      (k, v) for k, v in log.get("robust_accuracy", {}).items() if k != "clean"
  ]
  fig, (ax,) = _figure(1,
                       run.title,
                       width=max(7.0, 1.15 * (len(names) + len(steps)) + 2),
                       height=5.0)
  xs = list(range(len(names)))
  if steps:
    start = len(names) + 0.5
    xs += [start + i for i in range(len(steps))]
    labels += [f"AA after\n{k}" for k, _ in steps]
    heights += [100 * v for _, v in steps]
    texts += [f"{100 * v:.2f}%" for _, v in steps]
    colors += ["tab:brown"] * len(steps)
  bars = ax.bar(xs, heights, color=colors, width=0.7)
  if steps:
    ax.axvline(len(names) - 0.25, color="0.6", linestyle=":")
    ax.text((len(names) + xs[-1] + 0.5) / 2,
            108, "AutoAttack, attack by "
            "attack (each on the points still robust)",
            ha="center",
            fontsize=9,
            color="0.3")
  for i, bar in enumerate(bars):
    if i >= len(names):
      bar.set_alpha(0.5)
  ax.bar_label(bars, labels=texts, fontsize=9, padding=2)
  ax.set_xticks(xs, labels)
  ax.set_ylim(0, 115)
  ax.set_yticks(range(0, 101, 20))
  ax.set_ylabel("accuracy (%)")
  ax.grid(False, axis="x")
  total = {e["total"] for e in accuracies.values()}
  eps = run.setting("eps")
  eps_text = "" if eps is None else f"L-inf eps = {eps * 255:.3g}/255, "
  ax.set_title(f"clean and robust accuracy ({eps_text}"
               f"{', '.join(map(str, sorted(total)))} test images)")
  return _save(fig, path)


def comparison(runs: Sequence, labels: Sequence[str], path: str) -> str:
  """Per-epoch test accuracy (clean, the first robust attack) and train
  accuracy of several runs; stars mark each run's final evaluation."""
  attacks = []
  for run in runs:
    attacks += [n for n in _test_attacks(run.records) if n not in attacks]
  robust = next((n for n in ("pgd20", *attacks) if n != "clean"), "pgd20")
  panels = [("clean", "test accuracy, clean"),
            (robust, f"test accuracy, {attack_label(robust)}"),
            (None, "train accuracy (adversarial batches; natural: clean)")]
  fig, axes = _figure(3,
                      f"Comparison of {len(runs)} runs",
                      width=5.0,
                      height=5.0)
  handles = []
  for i, (run, label) in enumerate(zip(runs, labels)):
    color = f"C{i % 10}"
    final = run.accuracies()
    final_epoch = _last_epoch(run)
    for ax, (attack, _) in zip(axes, panels):
      key = (f"test_{attack}_acc"
             if attack else _train_accuracy_keys(run)[-1][0])
      epochs, values = _series(run.records, key)
      (line,) = ax.plot(epochs, [100 * v for v in values],
                        color=color,
                        marker="o" if attack else None,
                        markersize=3,
                        label=label)
      if attack in final and final_epoch is not None:
        ax.plot([final_epoch], [100 * final[attack]["accuracy"]],
                marker="*",
                markersize=13,
                color=color,
                markeredgecolor="black",
                markeredgewidth=0.6,
                clip_on=False,
                linestyle="none")
      if ax is axes[-1]:
        handles.append(line)
  last_epochs = [e for e in map(_last_epoch, runs) if e]
  for ax, (attack, title) in zip(axes, panels):
    _accuracy_axes(ax, title, max(last_epochs, default=None))
    if attack and not any(
        _series(r.records, f"test_{attack}_acc")[0] for r in runs):
      _note(ax, "no per-epoch test records;\n★ = final evaluation", y=0.06)
  fig.legend(handles,
             labels,
             loc="outside lower center",
             ncol=min(len(runs), 3),
             fontsize=9,
             title="run  (★ = final evaluation)")
  return _save(fig, path)


def plot_run(workdir: str) -> List[str]:
  """Writes learning_curves.png, schedules.png and (when the run has a final
  evaluation) robustness.png into `workdir`; returns the paths written."""
  run = runs_lib.load_run(workdir)
  curves, schedule_plot, robustness_plot = (
      workdir_lib.path(workdir, name) for name in workdir_lib.PLOTS)
  paths = [learning_curves(run, curves), schedules(run, schedule_plot)]
  if run.accuracies():
    paths.append(robustness(run, robustness_plot))
  return paths

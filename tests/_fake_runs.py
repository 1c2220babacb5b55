"""Workdirs that look like finished training runs, written without training.

The files have the shapes `train.train_and_evaluate` writes: config.json
(the resolved config), metrics.jsonl (train records every log_every_steps,
a test record per epoch), metrics.json (the final evaluation).
"""

import json
import math
import os

import numpy as np

from configs import default


def make_run(workdir,
             *,
             epochs=40,
             steps_per_epoch=20,
             log_every=5,
             lr=0.1,
             method="at",
             ard=True,
             prm=True,
             seed=0,
             attacks=("clean", "pgd20", "cw20"),
             num_eval_images=1000,
             epoch_eval=True,
             final=True):
  """Writes a fake run into `workdir`; returns its metrics.json dict."""
  rng = np.random.default_rng(seed)
  os.makedirs(workdir, exist_ok=True)
  config = default.get_config()
  config.epochs = float(epochs)
  config.optim.lr = lr
  config.method = method
  config.tricks.ard = ard
  config.tricks.prm = prm
  config.log_every_steps = log_every
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2)

  total_steps = epochs * steps_per_epoch
  level = 0.7 if method == "natural" else 0.55
  records = []
  for step in range(log_every, total_steps + 1, log_every):
    t = step / steps_per_epoch
    progress = 1 - math.exp(-t / 8)
    lr_t = lr if t < epochs - 5 else lr / 10 if t < epochs - 2 else lr / 100
    records.append({
        "step": step,
        "epoch": t,
        "train_accuracy": level * progress + rng.normal(0, 0.02),
        "train_grad_norm": 3 * math.exp(-t / 10) + 0.5 + rng.normal(0, 0.05),
        "train_loss": 2.3 * (1 - 0.6 * progress) + rng.normal(0, 0.03),
        "train_lr": lr_t,
        "train_r": min(t / 10, 1.0)
    })
    if method == "trades":  # TRADES logs clean and adversarial accuracy
      records[-1]["train_adversarial_accuracy"] = records[-1]["train_accuracy"]
      records[-1]["train_accuracy"] = 0.3 + records[-1]["train_accuracy"]
    if epoch_eval and step % steps_per_epoch == 0:
      records.append({
          "step":
              step,
          "epoch":
              step // steps_per_epoch,
          "test_num_eval_images":
              500,
          "test_clean_acc": (level + 0.25) * progress + rng.normal(0, 0.01),
          "test_clean_time_s":
              0.8,
          "test_pgd20_acc": (0.02 if method == "natural" else 0.45) * progress +
                            abs(rng.normal(0, 0.01)),
          "test_pgd20_time_s":
              9.5
      })
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  if not final:
    return None

  if method == "natural":
    robust_rate = {
        "clean": 0.93,
        "pgd20": 0.01,
        "cw20": 0.01,
        "pgd100": 0.0,
        "aa": 0.0
    }
  else:
    robust_rate = {
        "clean": 0.75,
        "pgd20": 0.45,
        "cw20": 0.43,
        "pgd100": 0.44,
        "aa": 0.41
    }
  metrics = {"num_eval_images": num_eval_images}
  for name in attacks:
    correct = max(int(round(robust_rate[name] * num_eval_images)) - seed, 0)
    metrics[f"{name}_acc"] = correct / num_eval_images
    metrics[f"{name}_time_s"] = 1.0 if name == "clean" else 20.0
  metrics.update(eps=8 / 255,
                 model="deit_tiny_patch16_224",
                 method=method,
                 ard=ard,
                 prm=prm,
                 steps=total_steps,
                 resumed_from_step=0,
                 train_time_s=1000.0,
                 eval_time_s=60.0,
                 wall_time_s=1070.0)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics

"""The optax chain equals PyTorch's clip_grad_norm_ + SGD(weight_decay) loop."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import cifar10
from configs import default
from vitat_jax import model_names
from vitat_jax import optim
from vitat_jax import validate
from vitat_jax.errors import UserError


def _config(**overrides):
  config = ml_collections.ConfigDict(
      dict(name="sgd",
           lr=0.1,
           momentum=0.9,
           weight_decay=1e-4,
           grad_clip=1.0,
           schedule="piecewise",
           warmup_epochs=0.0,
           nesterov=False,
           b1=0.9,
           b2=0.999,
           milestones=(5.0, 2.0),
           milestones_from="end"))
  config.update(overrides)
  return config


def _reference_lr(t, lr_max, epochs):
  # train_cifar.py's lr_schedule(t), t the fractional epoch.
  if t < epochs - 5:
    return lr_max
  if t < epochs - 2:
    return lr_max * 0.1
  return lr_max * 0.01


def _torch_semantics_numpy(params, grads_per_step, *, lr_max, epochs,
                           steps_per_epoch, momentum, weight_decay, max_norm):
  """The reference loop written out by hand, in float64.

  Per step: clip_grad_norm_(max_norm) (coefficient max_norm / (norm + 1e-6),
  capped at 1); SGD: d = g + wd * p; buf = momentum * buf + d (buf = d on
  the first step); p -= lr * buf; then lr = lr_schedule(epoch_now).
  """
  params = {k: v.astype(np.float64) for k, v in params.items()}
  buffers = None
  lr = lr_max
  for step, grads in enumerate(grads_per_step):
    grads = {k: g.astype(np.float64) for k, g in grads.items()}
    norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
    coef = min(max_norm / (norm + 1e-6), 1.0)
    grads = {k: g * coef for k, g in grads.items()}
    d = {k: grads[k] + weight_decay * params[k] for k in params}
    if buffers is None:
      buffers = d
    else:
      buffers = {k: momentum * buffers[k] + d[k] for k in params}
    params = {k: params[k] - lr * buffers[k] for k in params}
    epoch_now = (step + 1) / steps_per_epoch  # epoch - 1 + (i + 1) / S
    lr = _reference_lr(epoch_now, lr_max, epochs)
  return params


def test_sgd_chain_matches_the_pytorch_reference_loop():
  rng = np.random.default_rng(0)
  params = {
      "w": rng.normal(size=(5, 3)).astype(np.float32),
      "b": rng.normal(size=(3,)).astype(np.float32)
  }
  epochs, steps_per_epoch = 7, 3  # lr drops at t = 2 and t = 5
  num_steps = epochs * steps_per_epoch
  # Gradient norms both below and far above the clipping threshold.
  scales = rng.choice([0.05, 0.5, 5.0, 50.0], size=num_steps)
  grads_per_step = [{
      k: (s * rng.normal(size=v.shape)).astype(np.float32)
      for k, v in params.items()
  }
                    for s in scales]

  tx, schedule = optim.make_optimizer(_config(), epochs, steps_per_epoch)
  state = tx.init(params)
  ours = jax.tree.map(jnp.asarray, params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for grads in grads_per_step:
    updates, state = update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)

  expected = _torch_semantics_numpy(params,
                                    grads_per_step,
                                    lr_max=0.1,
                                    epochs=epochs,
                                    steps_per_epoch=steps_per_epoch,
                                    momentum=0.9,
                                    weight_decay=1e-4,
                                    max_norm=1.0)
  for k in params:
    np.testing.assert_allclose(ours[k], expected[k], rtol=2e-5, atol=2e-6)
  # The schedule itself, step by step (lr used at update `count`).
  for count in range(num_steps):
    t_prev = count / steps_per_epoch
    assert float(schedule(count)) == pytest.approx(
        _reference_lr(t_prev, 0.1, epochs))


def test_against_torch_when_installed():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(4, 4)).astype(np.float32)
  grads = [(s * rng.normal(size=(4, 4))).astype(np.float32)
           for s in (0.1, 3.0, 30.0, 0.2, 7.0, 0.01)]
  epochs, spe = 6, 1
  param = torch.nn.Parameter(torch.tensor(w0))
  opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, weight_decay=1e-4)
  for step, g in enumerate(grads):
    param.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([param], 1.0)
    opt.step()
    opt.param_groups[0]["lr"] = _reference_lr((step + 1) / spe, 0.1, epochs)
  tx, _ = optim.make_optimizer(_config(), epochs, spe)
  ours, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, ours)
    ours = optax.apply_updates(ours, updates)
  np.testing.assert_allclose(ours, param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clipping_off_and_adamw_arm_build():
  tx, _ = optim.make_optimizer(_config(grad_clip=0.0), 10, 5)
  state = tx.init({"w": jnp.ones(3)})
  updates, _ = tx.update({"w": jnp.full(3, 100.0)}, state, {"w": jnp.ones(3)})
  # No clipping: the full gradient (plus decay) times lr.
  np.testing.assert_allclose(updates["w"], -0.1 * (100.0 + 1e-4), rtol=1e-6)
  tx, schedule = optim.make_optimizer(
      _config(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cyclic"), 10,
      5)
  assert float(schedule(0)) == 0.0
  assert float(schedule(20)) == pytest.approx(1e-3)  # peak at 0.4 E
  tx.init({"w": jnp.ones(3)})


@pytest.mark.parametrize("overrides, fragment", [
    (dict(name="lamb"), "unknown optimizer"),
    (dict(schedule="step"), "unknown lr schedule"),
    (dict(lr=0.0), "must be positive"),
])
def test_bad_optimizer_settings(overrides, fragment):
  with pytest.raises(UserError, match=fragment):
    validate.check_optim(_config(**overrides), epochs=10)


def _lr_per_epoch(schedule, epochs, steps_per_epoch=4):
  return [float(schedule(e * steps_per_epoch)) for e in range(int(epochs))]


def test_milestones_count_from_the_end_or_from_the_start():
  # From the end (the reference's default): drops at 40 - 5 and 40 - 2.
  _, schedule = optim.make_optimizer(_config(), 40, 4)
  lrs = _lr_per_epoch(schedule, 40)
  assert lrs[:35] == [pytest.approx(0.1)] * 35
  assert lrs[35:38] == [pytest.approx(0.01)] * 3
  assert lrs[38:] == [pytest.approx(0.001)] * 2
  # From the start: the paper's text, epochs 36 and 38 of 40.
  _, schedule = optim.make_optimizer(
      _config(milestones=(36.0, 38.0), milestones_from="start"), 40, 4)
  lrs = _lr_per_epoch(schedule, 40)
  assert lrs[:36] == [pytest.approx(0.1)] * 36
  assert lrs[36:38] == [pytest.approx(0.01)] * 2
  assert lrs[38:] == [pytest.approx(0.001)] * 2
  # Absolute epochs do not move with the run's length.
  _, schedule = optim.make_optimizer(
      _config(milestones=(2.0,), milestones_from="start"), 3, 4)
  assert _lr_per_epoch(schedule, 3) == [
      pytest.approx(0.1),
      pytest.approx(0.1),
      pytest.approx(0.01)
  ]
  assert optim.milestone_epochs((5, 2), "end", 3) == (-2.0, 1.0)
  assert optim.milestone_epochs((36, 38), "start", 3) == (36.0, 38.0)


def test_the_default_milestones_are_the_references_e_minus_5_and_2():
  config = default.get_config()
  assert tuple(config.optim.milestones) == (5, 2)
  assert config.optim.milestones_from == "end"
  assert optim.lr_warning(config.optim, config.epochs) is None


def test_a_3_epoch_paper_recipe_warns_once_that_the_lr_never_reaches_lr(
    monkeypatch):
  config = cifar10.get_config("pretrained=scratch")
  config.epochs = 3.0
  warnings = []
  monkeypatch.setattr(optim.logging, "warning",
                      lambda fmt, *args: warnings.append(fmt % args))
  line = optim.log_lr_warning(config.optim, config.epochs)
  assert warnings == [line]
  assert "\n" not in line
  for fragment in ("never reaches optim.lr=0.1", "optim.milestones=(5.0, 2.0)",
                   "from the end", "epochs -2, 1", "trains at 0.01 from step 1",
                   "optim.milestones_from=start"):
    assert fragment in line, (fragment, line)
  # A run longer than the first drop, or one with absolute milestones, is
  # silent.
  warnings.clear()
  config.epochs = 6.0
  assert optim.log_lr_warning(config.optim, config.epochs) is None
  config.epochs = 3.0
  config.optim.milestones = (2.0,)
  config.optim.milestones_from = "start"
  assert optim.log_lr_warning(config.optim, config.epochs) is None
  assert not warnings


@pytest.mark.parametrize("milestones, milestones_from, fragment", [
    ((5.0, 2.0), "middle", "optim.milestones_from='middle'"),
    ((2.0, 5.0), "end", "strictly decreasing"),
    ((38.0, 36.0), "start", "strictly increasing"),
    ((0.0,), "start", "optim.milestones=0.0"),
])
def test_bad_milestones(milestones, milestones_from, fragment):
  config = default.get_config()
  config.optim.milestones = milestones
  config.optim.milestones_from = milestones_from
  with pytest.raises(UserError, match=fragment.replace("(", "\\(")):
    validate.check_config(config)


@pytest.mark.parametrize("how", ["arg", "override"])
def test_swin_gets_momentum_0_5_however_it_is_named(how):
  from configs import cifar10, imagenette  # pylint: disable=g-import-not-at-top
  swin = "swin_tiny_patch4_window7_224"
  for module in (cifar10, imagenette):
    arg = "root=/data" if module is imagenette else None
    if how == "arg":
      arg = f"model={swin}" + (f",{arg}" if arg else "")
      config = module.get_config(arg)
    else:
      config = module.get_config(arg)
      config.model.name = swin  # as --config.model.name=swin_...
    assert model_names.sgd_momentum(config.optim.momentum,
                                    config.model.name) == 0.5
  config.model.name = "deit_tiny_patch16_224"
  assert model_names.sgd_momentum(config.optim.momentum,
                                  config.model.name) == 0.9
  config.optim.momentum = 0.7  # an explicit value wins for every family
  assert model_names.sgd_momentum(config.optim.momentum, swin) == 0.7


def test_the_resolved_momentum_drives_sgd():
  params = {"w": jnp.zeros(1)}
  grads = {"w": jnp.ones(1)}
  config = _config(momentum=None, grad_clip=0.0, weight_decay=0.0)
  for name, momentum in (("swin_tiny_patch4_window7_224", 0.5),
                         ("deit_tiny_patch16_224", 0.9)):
    tx, schedule = optim.make_optimizer(config, 40, 10, name)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"],
                               -schedule(1) * (1 + momentum),
                               rtol=1e-6)

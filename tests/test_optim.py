"""The optax chain equals PyTorch's clip_grad_norm_ + SGD(weight_decay) loop;
AdamW's parameter groups and layer-wise lr decay against their closed forms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import cifar10
from configs import default
from tests import _tiny
from vitat_jax import models
from vitat_jax import model_names
from vitat_jax import optim
from vitat_jax import param_groups
from vitat_jax import setup
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError
from vitat_jax.models import registry


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
           milestones_from="end",
           no_decay="",
           no_decay_extra=(),
           layer_decay=0.0))
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
    (dict(no_decay="bias"), "unknown optim.no_decay='bias'"),
    (dict(no_decay_extra=("head", "(")), "'\\(' is not a regular expression"),
    (dict(layer_decay=1.5), "optim.layer_decay=1.5 must be .* in \\[0, 1\\]"),
    (dict(layer_decay=-0.5), "optim.layer_decay=-0.5"),
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


# Parameter groups: one tiny model of each family, as shapes (eval_shape:
# traced, nothing computed or compiled).
_FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(embed_dim=8, depth=1, num_heads=2)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(embed_dim=8, depth=1, num_heads=2)),
    "convit": ("convit_tiny",
               dict(embed_dim=4, depth=2, num_heads=2, local_up_to_layer=1)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(patch_size=2,
                  embed_dim=8,
                  depths=(1, 2),
                  num_heads=(1, 2),
                  window_size=2)),
}


@pytest.fixture(scope="module")
def family_params():
  trees = {}
  for family, (name, kwargs) in _FAMILIES.items():
    kwargs = {"img_size": 8, "patch_size": 4, "num_classes": 3, **kwargs}
    model = models.create(name, **kwargs)
    images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    trees[family] = jax.eval_shape(model.init, jax.random.key(0),
                                   images)["params"]
  return trees


_BLOCK_1D = ("attn/proj/bias", "mlp/fc1/bias", "mlp/fc2/bias", "norm1/bias",
             "norm1/scale", "norm2/bias", "norm2/scale")
_TOP_1D = ("head/bias", "norm/bias", "norm/scale")
# timm's no_weight_decay() names plus every 1-D param, by family.
_NO_DECAY = {
    "vit":
        _TOP_1D + ("cls_token", "patch_embed/bias", "pos_embed") +
        tuple(f"blocks_0/{n}" for n in _BLOCK_1D + ("attn/qkv/bias",)),
    "deit_distilled":
        _TOP_1D + ("cls_token", "dist_token", "head_dist/bias",
                   "patch_embed/bias", "pos_embed") +
        tuple(f"blocks_0/{n}" for n in _BLOCK_1D + ("attn/qkv/bias",)),
    # Block 0 is a GPSA block (gating and positional projection, qk/v without
    # bias), block 1 a plain one without a qkv bias.
    "convit":
        _TOP_1D + ("cls_token", "patch_embed/bias", "pos_embed") +
        tuple(f"blocks_0/{n}" for n in _BLOCK_1D +
              ("attn/gating_param", "attn/pos_proj/bias")) +
        tuple(f"blocks_1/{n}" for n in _BLOCK_1D),
    "swin":
        _TOP_1D + ("patch_embed/norm/bias", "patch_embed/norm/scale",
                   "patch_embed/proj/bias", "layers_1/downsample/norm/bias",
                   "layers_1/downsample/norm/scale") +
        tuple(f"{block}/{n}"
              for block in ("layers_0/blocks_0", "layers_1/blocks_0",
                            "layers_1/blocks_1")
              for n in _BLOCK_1D +
              ("attn/qkv/bias", "attn/relative_position_bias_table")),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_the_no_decay_params_of_each_family(family_params, family):
  params = family_params[family]
  adamw = _config(name="adamw")
  assert sorted(param_groups.no_decay_names(adamw, params)) == sorted(
      _NO_DECAY[family])
  # SGD decays every param unless asked (the reference's); asked, the same
  # groups.
  assert param_groups.decay_mask(_config()) is None
  assert param_groups.no_decay_names(_config(no_decay="none", name="adamw"),
                                     params) == []
  assert sorted(param_groups.no_decay_names(
      _config(no_decay="auto"), params)) == sorted(_NO_DECAY[family])
  # Extra patterns add to either rule.
  extra = param_groups.no_decay_names(_config(no_decay_extra=("^head/",)),
                                      params)
  assert extra == ["head/bias", "head/kernel"]


# Layer ids by module (a leaf's name without its last part): patch
# embedding and tokens 0, block i i + 1 (Swin's counted through the stages,
# a stage's patch merging with its first block), final norm and head L.
_LAYER_IDS = {
    "vit": ({
        "cls_token": 0,
        "pos_embed": 0,
        "patch_embed": 0,
        "blocks_0/attn/qkv": 1,
        "blocks_0/norm1": 1,
        "norm": 2,
        "head": 2
    }, 2),
    "deit_distilled": ({
        "dist_token": 0,
        "blocks_0/mlp/fc2": 1,
        "head_dist": 2
    }, 2),
    "convit": (
        {
            "pos_embed": 0,
            "blocks_0/attn": 1,  # gating_param
            "blocks_0/attn/pos_proj": 1,
            "blocks_1/attn/qkv": 2,
            "norm": 3,
            "head": 3
        },
        3),
    "swin": (
        {
            "patch_embed/proj": 0,
            "patch_embed/norm": 0,
            "layers_0/blocks_0/attn": 1,  # relative_position_bias_table
            "layers_1/downsample/reduction": 2,
            "layers_1/downsample/norm": 2,
            "layers_1/blocks_0/mlp/fc1": 2,
            "layers_1/blocks_1/norm2": 3,
            "norm": 4,
            "head": 4
        },
        4),
}


def _module(name):
  return name.rsplit("/", 1)[0] if "/" in name else name


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_the_layer_decay_scales_of_each_family(family_params, family):
  ids, num_layers = param_groups.layer_ids(family_params[family])
  expected, expected_layers = _LAYER_IDS[family]
  assert num_layers == expected_layers
  by_module = {_module(name): i for name, i in ids.items()}
  assert {m: by_module[m] for m in expected} == expected
  # Every leaf has an id in [0, L], the blocks' in order.
  assert set(ids.values()) == set(range(num_layers + 1))
  scales = param_groups.layer_scales(0.5, family_params[family])
  for name, i in ids.items():
    assert scales[name] == 0.5**(num_layers - i)
  assert max(scales.values()) == 1.0
  assert min(scales.values()) == 0.5**num_layers


def _toy_params():
  """A 2-block tree named as the ViTs' are: L = 3."""
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
      "patch_embed": {
          "kernel": normal(2, 2, 3, 4),
          "bias": normal(4)
      },
      "cls_token": normal(1, 1, 4),
      "blocks_0": {
          "fc": {
              "kernel": normal(4, 4),
              "bias": normal(4)
          }
      },
      "blocks_1": {
          "fc": {
              "kernel": normal(4, 4),
              "bias": normal(4)
          }
      },
      "head": {
          "kernel": normal(4, 3),
          "bias": normal(3)
      },
  }


def _grads(params, scale, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
      params)


def test_one_adamw_step_with_groups_and_warmup_cosine_is_the_closed_form():
  """Decoupled decay on the kernels only; the lr of the warm-up + cosine
  schedule (optim.warmup_epochs), checked on its own."""
  params = _toy_params()
  lr, wd, b1, b2, eps = 1e-2, 0.05, 0.9, 0.999, 1e-8
  epochs, spe = 4, 2  # 8 steps, 2 of warm-up
  config = _config(name="adamw",
                   lr=lr,
                   weight_decay=wd,
                   grad_clip=0.0,
                   schedule="cosine",
                   warmup_epochs=1.0)
  tx, schedule = optim.make_optimizer(config, epochs, spe)

  def expected_lr(t):
    if t < 2:
      return lr * t / 2
    return lr * 0.5 * (1 + np.cos(np.pi * (t - 2) / 6))

  for t in range(9):
    assert float(schedule(t)) == pytest.approx(expected_lr(t), abs=1e-9)
  state, update = tx.init(params), jax.jit(tx.update)
  grads = [_grads(params, 1.0, seed) for seed in range(3)]
  for g in grads:  # the params are held fixed: the update is the closed form
    updates, state = update(g, state, params)
  flat_p = dict(param_groups.named_leaves(params))
  flat_u = dict(param_groups.named_leaves(updates))
  flat_g = [dict(param_groups.named_leaves(g)) for g in grads]
  for name, p in flat_p.items():
    m = v = 0.0
    for g in flat_g:
      g = np.asarray(g[name], np.float64)
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    n = len(flat_g)
    adam = (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + eps)
    decayed = name.endswith("kernel")  # not biases, not the class token
    closed = -expected_lr(n - 1) * (adam +
                                    (wd * np.asarray(p) if decayed else 0.0))
    np.testing.assert_allclose(flat_u[name], closed, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_layer_decay_scales_the_whole_update_of_a_leaf(name):
  """With clipping active and weight decay on, each leaf's update is its
  scale times the update without layer decay: timm's per-group lr."""
  params = _toy_params()
  common = dict(name=name, grad_clip=1.0, schedule="constant", lr=0.1)
  if name == "adamw":
    common.update(weight_decay=0.05, lr=1e-3)
  plain, _ = optim.make_optimizer(_config(**common), 4, 2)
  decayed, _ = optim.make_optimizer(_config(layer_decay=0.5, **common), 4, 2)
  scales = param_groups.layer_scales(0.5, params)
  assert scales["patch_embed/kernel"] == scales["cls_token"] == 0.125
  assert scales["blocks_0/fc/kernel"] == 0.25
  assert scales["blocks_1/fc/bias"] == 0.5 and scales["head/kernel"] == 1.0
  plain_state, decayed_state = plain.init(params), decayed.init(params)
  plain_update, decayed_update = jax.jit(plain.update), jax.jit(decayed.update)
  for seed in range(3):
    g = _grads(params, 10.0, seed)  # global norm far above 1: clipped
    u_plain, plain_state = plain_update(g, plain_state, params)
    u_decayed, decayed_state = decayed_update(g, decayed_state, params)
    for leaf, u in param_groups.named_leaves(u_decayed):
      expected = dict(param_groups.named_leaves(u_plain))[leaf]
      np.testing.assert_allclose(u, scales[leaf] * expected, rtol=1e-6)


def test_the_paper_sgd_chain_is_unchanged():
  """The paper config's optimizer is the chain from before the groups:
  the same state tree and the same updates, bit for bit."""
  opt = cifar10.get_config("pretrained=scratch").optim
  assert (opt.name, opt.no_decay, opt.layer_decay) == ("sgd", "", 0.0)
  assert not param_groups.grouped(opt)
  tx, _ = optim.make_optimizer(opt, 40, 3)
  before = optax.chain(
      optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4),
      optax.sgd(optim.piecewise_lr(0.1, 40, 3), momentum=0.9, nesterov=False))
  params = _toy_params()
  state, state_before = tx.init(params), before.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(state_before)
  for seed in range(3):
    g = _grads(params, 3.0, seed)
    updates, state = tx.update(g, state, params)
    expected, state_before = before.update(g, state_before, params)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(u, e)
  # AdamW asked to decay everything is AdamW from before the groups.
  tx, schedule = optim.make_optimizer(_config(name="adamw", no_decay="none"), 4,
                                      2)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optax.adamw(schedule)).init(params))


def test_sgd_with_groups_skips_the_decay_of_the_excluded_params():
  params = _toy_params()
  tx, _ = optim.make_optimizer(
      _config(no_decay="auto",
              grad_clip=0.0,
              schedule="constant",
              weight_decay=0.1), 4, 2)
  g = _grads(params, 1.0, 0)
  updates, _ = tx.update(g, tx.init(params), params)
  # First SGD step: -lr * (g + wd * p) where decayed, -lr * g elsewhere.
  np.testing.assert_allclose(updates["blocks_0"]["fc"]["kernel"],
                             -0.1 * (g["blocks_0"]["fc"]["kernel"] +
                                     0.1 * params["blocks_0"]["fc"]["kernel"]),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["cls_token"],
                             -0.1 * g["cls_token"],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"],
                             -0.1 * g["head"]["bias"],
                             rtol=1e-6)


def test_layer_decay_only_for_the_families_that_have_layer_ids(monkeypatch):
  for name in ("vit_base_patch16_224", "deit_tiny_distilled_patch16_224",
               "convit_tiny", "swin_tiny_patch4_window7_224"):
    validate.check_optim(_config(layer_decay=0.75), 10, name)

  class Toy(models.VisionTransformer.__base__):  # a Flax module, no blocks
    pass

  monkeypatch.setitem(registry._REGISTRY, "toy_net", (Toy, {}))
  validate.check_optim(_config(layer_decay=1.0), 10, "toy_net")  # off
  with pytest.raises(UserError,
                     match="optim.layer_decay=0.75 is not supported for model "
                     "'toy_net'.*set optim.layer_decay=0"):
    validate.check_optim(_config(layer_decay=0.75), 10, "toy_net")


def test_training_logs_the_groups_once(monkeypatch, tmp_path):
  config = _tiny.config(**{
      "optim.name": "adamw",
      "optim.lr": 1e-3,
      "optim.layer_decay": 0.75
  })
  lines = []
  monkeypatch.setattr(optim.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  setup.prepare(config, str(tmp_path / "run"), "train")
  [line] = [l for l in lines if "weight decay off" in l]
  assert "\n" not in line
  # The tiny DeiT: 1 block of 8 one-dimensional params, 4 outside (norm,
  # head and patch embedding biases), the
  # class token and the position embedding.
  for fragment in ("optim.no_decay='auto'", "for 14 of 20 param arrays",
                   "blocks_* (x1): {attn/proj/bias, attn/qkv/bias", "cls_token",
                   "pos_embed", "layer decay 0.75, L=2",
                   "lr scale 0.5625 (layer 0"):
    assert fragment in line, (fragment, line)
  # Nothing to say for the paper's SGD.
  lines.clear()
  setup.prepare(_tiny.config(), str(tmp_path / "sgd"), "train")
  assert not [l for l in lines if "weight decay off" in l]


def test_older_adamw_runs_decayed_every_param():
  upgrade = workdir_lib.upgrade_run_config
  assert upgrade({"optim": {"name": "adamw"}})["optim"]["no_decay"] == "none"
  sgd = upgrade({"optim": {"name": "sgd"}})["optim"]
  assert (sgd["no_decay"], sgd["no_decay_extra"],
          sgd["layer_decay"]) == ("", [], 0.0)
  assert upgrade({"optim": {
      "name": "adamw",
      "no_decay": "auto"
  }})["optim"]["no_decay"] == "auto"


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

"""One full training step against a PyTorch re-implementation of the reference.

For AT, TRADES and MART with ARD and PRM on (r = 0.5), our jitted train step
and a torch step written after the reference's train_cifar.py, run on the
timm model loaded with our parameters, must give the same loss and the same
updated parameters. The random draws (start perturbation, PRM masks, ARD
gammas) are re-derived from the keys exactly as `train_step.make_train_step`,
the objectives and `attacks.perturb` derive them, and fed to the torch side.

The torch side works in pixel space (normalisation is the model wrapper's
first operation), which is the reference's normalised-space clamps
(eps / std per channel, (0 - mu) / std .. (1 - mu) / std) written in the
units it was derived from. ARD is the reference's gate: the gradient at
each block's attention-branch output is multiplied by gamma.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
F = torch.nn.functional

from configs import default  # pylint: disable=g-import-not-at-top
from vitat_jax import attacks
from vitat_jax import pretrained
from vitat_jax import masks
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import state as state_lib
from vitat_jax import train_step

torch.set_num_threads(1)

MODEL_KWARGS = dict(num_classes=10,
                    img_size=16,
                    patch_size=4,
                    embed_dim=32,
                    depth=2,
                    num_heads=2)
# A Swin whose own patch (2 px, an 8x8 token grid) differs from the PRM cell
# (4 px, a 4x4 grid), with a shifted block in its first stage; no drop-path
# (torch would draw its own).
SWIN_KWARGS = dict(num_classes=10,
                   img_size=16,
                   patch_size=2,
                   embed_dim=16,
                   depths=(2, 2),
                   num_heads=(2, 2),
                   window_size=4,
                   drop_path_rate=0.0)
MODELS = {
    "deit_tiny_patch16_224": MODEL_KWARGS,
    "swin_tiny_patch4_window7_224": SWIN_KWARGS
}
BATCH, STEPS, EPS, ALPHA, LR = 8, 3, 8 / 255, 2 / 255, 0.1
# r(t) = t / n_w at t = (0 + 1) / steps_per_epoch = 0.5 with n_w = 1.
STEPS_PER_EPOCH, WARMUP_EPOCHS = 2, 1.0
R = 0.5
PRM_PATCH = 4  # the reference's --patch


def _config(method):
  config = default.get_config()
  config.method = method
  config.tricks.ard = config.tricks.prm = True
  config.tricks.prm_patch_size = PRM_PATCH
  config.tricks.warmup_epochs = WARMUP_EPOCHS
  config.attack.steps = STEPS
  config.augment.crop_padding = 0
  config.augment.flip = False
  config.mixup.prob = 0.0
  config.optim.lr = LR
  return config


def _reference_prm_mask(cells_kept, size):
  """The reference's add_noise_mask: zero on args.patch-px cells, NHWC."""
  grid = size // PRM_PATCH
  mask = np.ones((1, size, size, 1), np.float32)
  ids = np.flatnonzero(np.asarray(cells_kept).reshape(-1) == 0)
  for r, c in zip(ids // grid, ids % grid):
    mask[:, r * PRM_PATCH:(r + 1) * PRM_PATCH,
         c * PRM_PATCH:(c + 1) * PRM_PATCH] = 0
  return mask


def _reference_draws(model, x, loop_key, init):
  """The start perturbation, PRM masks and ARD gammas our step draws.

  Only the random numbers are taken from our keys (which cells, which
  gammas, the N(0, 1) or U(-1, 1) draws); what the reference makes of them
  (the PRM geometry, the start's units and clamps) is re-stated here.
  """
  step_key = jax.random.fold_in(loop_key, 0)
  _, _, objective_key = jax.random.split(step_key, 3)
  attack_key, _ = jax.random.split(objective_key)
  init_key, attack_loop_key = jax.random.split(attack_key)
  if init == "uniform":
    delta0 = attacks.uniform_init(init_key, x, EPS)
  else:
    # 0.001 * randn in normalised units, clamped to the normalised box.
    noise = np.asarray(jax.random.normal(init_key, x.shape, x.dtype))
    delta0 = np.clip(0.001 * noise * np.asarray(model.std, np.float32),
                     -np.asarray(x), 1 - np.asarray(x))
  prm, ard = [], []
  grid = model.img_size // PRM_PATCH
  for i in range(STEPS):
    mask_key, ard_key = jax.random.split(jax.random.fold_in(attack_loop_key, i))
    prm.append(
        _reference_prm_mask(masks.prm_grid_mask(mask_key, R, grid),
                            model.img_size))
    ard.append(
        np.asarray(masks.ard_keep(ard_key, R, model.num_attention_blocks)))
  return np.asarray(delta0), prm, ard, attack_key


def _nchw(a):
  return torch.from_numpy(
      np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


class _Reference:
  """timm model + pixel-space normalisation + the reference's ARD gate."""

  def __init__(self, name, model, params):
    torch.manual_seed(0)
    self.net = timm.create_model(name, pretrained=False, **MODELS[name])
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in pretrained.timm_state_dict(params, model).items()
    }
    self.net.load_state_dict(state, strict=True)
    self.mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    self.std = torch.tensor(model.std).view(1, 3, 1, 1)
    self.gammas = None  # one value per block while the attack runs
    if name.startswith("swin"):
      # The window-attention branch, after the reverse shift: what enters
      # drop_path1 (the reference hooks each SwinTransformerBlock's
      # drop_path).
      branches = [
          b.drop_path1 for layer in self.net.layers for b in layer.blocks
      ]
    else:
      branches = [b.attn for b in self.net.blocks]
    for index, branch in enumerate(branches):
      branch.register_forward_hook(self._gate(index))

  def _gate(self, index):

    def hook(module, inputs, output):
      del module, inputs
      if self.gammas is not None and output.requires_grad:
        gamma = float(self.gammas[index])
        output.register_hook(lambda grad: grad * gamma)
      return output

    return hook

  def __call__(self, x):
    return self.net((x - self.mean) / self.std)


def _clamp(x, lower, upper):
  return torch.max(torch.min(x, upper), lower)


def _attack(ref, X, delta0, prm, ard, loss_fn):
  """The reference's inner loop (train_cifar.py) with fixed draws."""
  ref.net.eval()
  delta = _nchw(delta0)
  delta.requires_grad = True
  for i in range(STEPS):
    ref.gammas = ard[i]
    delta = delta * _nchw(prm[i])  # if args.PRM
    loss = loss_fn(X + delta)
    grad = torch.autograd.grad(loss, delta)[0].detach()
    delta.data = _clamp(delta + ALPHA * torch.sign(grad), -EPS * torch.ones(1),
                        EPS * torch.ones(1))
    delta.data = _clamp(delta, -X, 1 - X)
  ref.gammas = None  # handle.remove()
  ref.net.train()
  return delta.detach()


def _torch_step(method, ref, X, y, delta0, prm, ard, beta=6.0):
  batch_size = len(X)
  if method == "at":
    delta = _attack(ref, X, delta0, prm, ard,
                    lambda xa: F.cross_entropy(ref(xa), y))
    loss = F.cross_entropy(ref(X + delta), y)
  elif method == "trades":
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    delta = _attack(
        ref, X, delta0, prm, ard, lambda xa: criterion_kl(
            F.log_softmax(ref(xa), dim=1), F.softmax(ref(X), dim=1)))
    x_adv = (X + delta).detach()
    logits = ref(X)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(
        F.log_softmax(ref(x_adv), dim=1), F.softmax(ref(X), dim=1))
    loss = loss_natural + beta * loss_robust
  else:
    kl = torch.nn.KLDivLoss(reduction="none")
    delta = _attack(ref, X, delta0, prm, ard,
                    lambda xa: F.cross_entropy(ref(xa), y))
    x_adv = (X + delta).detach()
    logits = ref(X)
    logits_adv = ref(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) *
        (1.0000001 - true_probs))
    loss = loss_adv + float(beta) * loss_robust
  opt = torch.optim.SGD(ref.net.parameters(),
                        lr=LR,
                        momentum=0.9,
                        weight_decay=1e-4)
  opt.zero_grad()
  loss.backward()
  torch.nn.utils.clip_grad_norm_(ref.net.parameters(), 1.0)
  opt.step()
  return loss.item(), {
      k: v.detach().numpy() for k, v in ref.net.state_dict().items()
  }


@functools.lru_cache(maxsize=None)
def _setup(name):
  model = models.create(name, **MODELS[name])
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (BATCH, 16, 16, 3)).astype(np.uint8)
  labels = (np.arange(BATCH) % 10).astype(np.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  # Larger weights than init's so the step is not dominated by clipping ties.
  params = jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.key(p.size), p.shape),
      params)
  return model, images, labels, params


# Swin runs AT and TRADES (MART's attack is AT's, its loss is model-free).
@pytest.mark.parametrize(
    "name,method,init",
    [("deit_tiny_patch16_224", "at", "uniform"),
     ("deit_tiny_patch16_224", "trades", "gaussian"),
     ("deit_tiny_patch16_224", "mart", "gaussian"),
     ("swin_tiny_patch4_window7_224", "at", "uniform"),
     ("swin_tiny_patch4_window7_224", "trades", "gaussian")])
def test_one_step_matches_the_reference(name, method, init):
  model, images, labels, params = _setup(name)
  config = _config(method)
  objective = objectives.make_objective(config, model)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs,
                                      STEPS_PER_EPOCH)
  step = jax.jit(
      train_step.make_train_step(config, model, objective, tx, schedule,
                                 STEPS_PER_EPOCH, 10))
  state = state_lib.TrainState(jnp.asarray(0, jnp.int32), params,
                               tx.init(params))
  loop_key = jax.random.key(7)
  # The same program, compiled without XLA's backend optimisations (half the
  # compile time of this one step; the numbers are the program's either way).
  compiled = step.lower(state, images, labels,
                        loop_key).compile({"xla_backend_optimization_level": 0})
  new_state, metrics = compiled(state, images, labels, loop_key)
  assert float(metrics["r"]) == pytest.approx(R)

  x = images.astype(np.float32) / 255.0
  delta0, prm, ard, attack_key = _reference_draws(model, jnp.asarray(x),
                                                  loop_key, init)
  # Our attack starts where the reference's does (TRADES / MART: 0.001 N(0, 1)
  # in normalised units); the sign steps after it would hide a wrong scale.
  start = objectives.training_attack(model,
                                     params,
                                     jnp.asarray(x),
                                     attack_key,
                                     R,
                                     eps=EPS,
                                     alpha=ALPHA,
                                     steps=0,
                                     attack_loss=jnp.sum,
                                     init=init)
  np.testing.assert_allclose(np.asarray(start),
                             np.clip(x + delta0, 0, 1),
                             rtol=0,
                             atol=1e-7)
  # The draws really vary: some cells masked, some gammas 0 and some 1.
  assert all(0 < m.mean() < 1 for m in prm)
  assert 0 < np.mean(ard) < 1
  ref = _Reference(name, model, params)
  ref_loss, ref_state = _torch_step(method, ref, _nchw(x),
                                    torch.from_numpy(labels).long(), delta0,
                                    prm, ard)

  loss_rel = abs(float(metrics["loss"]) - ref_loss) / abs(ref_loss)
  ours = pretrained.timm_state_dict(new_state.params, model)
  before = pretrained.timm_state_dict(params, model)
  num = sum(np.sum((ours[k] - ref_state[k])**2) for k in ours)
  param_rel = np.sqrt(num / sum(np.sum(ref_state[k]**2) for k in ours))
  update_rel = np.sqrt(num /
                       sum(np.sum((ref_state[k] - before[k])**2) for k in ours))
  print(
      f"{name} {method}: loss rel {loss_rel:.2e}, params rel {param_rel:.2e}, "
      f"update rel {update_rel:.2e}")
  assert loss_rel <= 1e-5
  assert param_rel <= 1e-4
  # The update itself (new - old), not only the parameters, agrees.
  assert update_rel <= 1e-3
  for k in ours:
    np.testing.assert_allclose(ours[k],
                               ref_state[k],
                               rtol=1e-4,
                               atol=1e-5,
                               err_msg=k)


def test_trades_on_a_stochastic_swin_runs_two_clean_forwards():
  """TRADES with drop-path: the CE term and the KL target come from two
  train-mode forwards of the clean batch with independent keys.

  The reference's outer step is CE(model(X), y) + beta / B *
  KL(softmax(model(X)) || softmax(model(x_adv))) with a fresh model(X) for
  the target, each forward drawing its own drop-path masks (the torch
  re-statement above writes it so). Values are compared with torch at
  drop_path 0 (`test_one_step_matches_the_reference`, the Swin TRADES
  case), where every forward is deterministic. Drawing the same masks on
  both sides would mean re-deriving Flax's per-module RNG streams inside
  torch's DropPath, so with drop_path 0.5 this test checks the structure
  instead: our loss equals the outer loss re-stated from three train-mode
  forwards with keys split(dropout_key, 3), the two clean forwards differ
  (their masks do), and so the one-forward loss would differ. A model
  without dropout or drop-path keeps its single clean forward (bitwise as
  before: the parity cases above).
  """
  name = "swin_tiny_patch4_window7_224"
  _, images, labels, params = _setup(name)
  model = models.create(name, **dict(SWIN_KWARGS, drop_path_rate=0.5))
  assert objectives.is_stochastic(model)
  assert not objectives.is_stochastic(_setup("deit_tiny_patch16_224")[0])
  x = jnp.asarray(images, jnp.float32) / 255.0
  batch = {"image": x, "target": jax.nn.one_hot(labels, 10)}
  key = jax.random.key(5)
  loss_fn = functools.partial(objectives.trades_loss,
                              model=model,
                              eps=EPS,
                              alpha=ALPHA,
                              steps=0,
                              ard=False,
                              prm=False,
                              prm_patch_size=PRM_PATCH)

  @jax.jit
  def ours_and_restated(params):
    loss, _ = loss_fn(params, batch, key, R)
    attack_key, dropout_key = jax.random.split(key)
    x_adv = objectives.training_attack(model,
                                       params,
                                       x,
                                       attack_key,
                                       R,
                                       eps=EPS,
                                       alpha=ALPHA,
                                       steps=0,
                                       attack_loss=jnp.sum,
                                       init="gaussian")
    natural_key, adversarial_key, target_key = jax.random.split(dropout_key, 3)

    def forward(images, k):
      return model.apply({"params": params},
                         images,
                         train=True,
                         rngs={"dropout": k})

    logits, logits_adv = forward(x,
                                 natural_key), forward(x_adv, adversarial_key)
    logits_target = forward(x, target_key)
    two = objectives.trades_outer_loss(logits, logits_adv, batch["target"], 6.0,
                                       logits_target)
    one = objectives.trades_outer_loss(logits, logits_adv, batch["target"], 6.0)
    return loss, two, one, jnp.abs(logits - logits_target).max()

  loss, two, one, clean_gap = ours_and_restated(params)
  np.testing.assert_allclose(float(loss), float(two), rtol=1e-6)
  assert float(clean_gap) > 1e-4
  assert abs(float(one) - float(two)) > 1e-6

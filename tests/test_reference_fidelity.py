"""Where the reference repository decides a number, we decide it the same way.

Each test pins one finding of the audit against
mo666666/When-Adversarial-Training-Meets-Vision-Transformers
(docs/reference_differences.md lists what still differs, and why).
"""

import importlib
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vitat_jax import pretrained
from vitat_jax import model_names
from vitat_jax import models
from vitat_jax import objectives
from vitat_jax import optim
from vitat_jax import state as state_lib
from vitat_jax import train_step
from vitat_jax import validate
from vitat_jax import workdir as workdir_lib
from vitat_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8)
# One small 32-px size per family, for the tests below that span families.
TINY_FAMILIES = {
    "deit_tiny_patch16_224":
        dict(embed_dim=64, num_heads=4, depth=1, patch_size=8),
    "convit_tiny":
        dict(embed_dim=16,
             num_heads=4,
             depth=2,
             local_up_to_layer=1,
             patch_size=8),
    "swin_tiny_patch4_window7_224":
        dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=4),
}


def _family(name):
  for family in ("swin", "convit"):
    if name.startswith(family):
      return next(n for n in TINY_FAMILIES if n.startswith(family))
  return "deit_tiny_patch16_224"


def _timm():
  return pytest.importorskip("timm")


# --- 1. The in21k pre-logits layer -----------------------------------------


def test_in21k_vit_fine_tuned_has_exactly_timm_vit_b_params():
  timm = _timm()
  ours = models.create("vit_base_patch16_224_in21k", num_classes=10)
  assert not ours.has_pre_logits
  abstract = pretrained.convert._param_shapes(ours)  # pylint: disable=protected-access
  shapes = {
      pretrained.naming.timm_key(path, "vit"):
          pretrained.naming.timm_shape(spec.shape, path[-1])
      for path, spec in abstract.items()
  }
  reference = timm.create_model("vit_base_patch16_224",
                                pretrained=False,
                                num_classes=10)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert shapes == expected
  # At the in21k class count the layer is there, as in the checkpoint.
  assert models.create("vit_base_patch16_224_in21k").has_pre_logits


def test_in21k_checkpoint_with_pre_logits_loads_without_it(tmp_path, caplog):
  timm = _timm()
  torch = pytest.importorskip("torch")
  safetensors = pytest.importorskip("safetensors.torch")
  # An in21k-style file: 21843-class head plus the tanh pre-logits layer.
  source = timm.create_model("vit_base_patch16_224",
                             pretrained=False,
                             num_classes=21843,
                             **TINY_VIT)
  state = {k: v.detach().clone() for k, v in source.state_dict().items()}
  state["pre_logits.fc.weight"] = torch.randn(32, 32)
  state["pre_logits.fc.bias"] = torch.randn(32)
  path = str(tmp_path / "in21k.safetensors")
  safetensors.save_file(state, path)

  model = models.create("vit_base_patch16_224_in21k",
                        num_classes=10,
                        **TINY_VIT)
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with caplog.at_level(logging.WARNING):
    params = pretrained.load(path, model, init_params=init)
  notes = [
      r.getMessage() for r in caplog.records if "pre_logits" in r.getMessage()
  ]
  assert len(notes) == 1 and "ignored" in notes[0], notes
  assert "pre_logits" not in params

  reference = timm.create_model("vit_base_patch16_224",
                                pretrained=False,
                                num_classes=10,
                                **TINY_VIT).eval()
  reference.load_state_dict(
      {
          k: torch.from_numpy(np.array(v))
          for k, v in pretrained.timm_state_dict(params, model).items()
      },
      strict=True)
  for k, v in state.items():  # the body is the checkpoint's, untouched
    if not k.startswith(("head", "pre_logits")):
      np.testing.assert_array_equal(reference.state_dict()[k].numpy(),
                                    v.numpy(),
                                    err_msg=k)
  x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  mean, std = np.array(model.mean), np.array(model.std)
  with torch.no_grad():
    expected = reference(
        torch.from_numpy(
            ((x - mean) / std).transpose(0, 3, 1,
                                         2).astype(np.float32))).numpy()
  ours = model.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


# --- 2. The PRM grid --------------------------------------------------------


@pytest.mark.parametrize("r", [0.0, 0.3, 0.77])
def test_swin_prm_mask_at_224_masks_16px_cells(r):
  config = importlib.import_module("configs.imagenette").get_config(
      "root=x,model=swin_tiny_patch4_window7_224,pretrained=scratch,"
      "ard_prm=True")
  model = state_lib.build_model(config)
  assert (model.patch_size, config.tricks.prm_patch_size) == (4, 16)
  _, prm_fn = objectives.make_attack_masks(
      model, ard=False, prm=True, prm_patch_size=config.tricks.prm_patch_size)
  mask = np.asarray(prm_fn(jax.random.key(3), r))[0, :, :, 0]
  assert mask.shape == (224, 224)
  cells = mask.reshape(14, 16, 14, 16)
  assert np.all(cells == cells[:, :1, :, :1])  # constant per 16x16 cell
  assert int((cells[:, 0, :, 0] == 0).sum()) == int(196 * (1 - r))


def test_prm_patch_size_that_does_not_tile_the_image_is_one_line():
  config = importlib.import_module("configs.quickstart").get_config()
  config.tricks.prm_patch_size = 5
  with pytest.raises(UserError) as error:
    validate.check_config(config)
  assert "prm_patch_size=5" in str(error.value)
  assert "\n" not in str(error.value)


# --- 3. Every (model, dataset) pair the reference trains --------------------

REFERENCE_PAIRS = ([("cifar10", m) for m in common.PAPER_MODELS] + [
    ("imagenette", m) for m in common.PAPER_MODELS + common.SWIN_MODELS
] + [("imagenet", "vit_base_patch16_224_in21k"),
     ("imagenet", "swin_base_patch4_window7_224_in22k")])


def _paper_config(dataset, model, tmp_path):
  module = importlib.import_module(f"configs.{dataset}")
  arg = f"model={model},ard_prm=True,pretrained_dir={tmp_path}"
  if dataset == "imagenette":
    arg += f",root={tmp_path}"
  return module.get_config(arg)


def _reduce(config):
  """The same recipe on a 32-px, one-or-two-block version of the model."""
  config.init.checkpoint = ""
  config.data.image_size = 32
  config.model.img_size = 32
  config.model.num_classes = 10
  config.tricks.prm_patch_size = min(config.tricks.prm_patch_size, 16)
  for key, value in TINY_FAMILIES[_family(config.model.name)].items():
    if key in config.model and isinstance(value, tuple):
      del config.model[key]  # an int field; Swin takes one per stage
    config.model[key] = value
  config.batch_size = 4
  config.accum_steps = 1
  return config


def _step_inputs(config):
  config = _reduce(config)
  validate.check_config(config)
  model = state_lib.build_model(config)
  objective = objectives.make_objective(config, model)
  tx, schedule = optim.make_optimizer(config.optim, config.epochs, 10,
                                      config.model.name)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  step = jax.jit(
      train_step.make_train_step(config, model, objective, tx, schedule, 10,
                                 10))
  images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3), np.uint8)
  return model, tx, params, step, (images, np.arange(4, dtype=np.int32),
                                   jax.random.key(1))


@pytest.mark.parametrize("dataset,model_name", REFERENCE_PAIRS)
def test_reference_pair_traces_one_training_step(dataset, model_name, tmp_path):
  # Every pair, with its own recipe, through one whole step (attack, loss,
  # update) at a reduced size: traced, which is where a config that cannot
  # build fails. The Imagenette Swin also runs (below).
  config = _paper_config(dataset, model_name, tmp_path)
  expected_momentum = 0.5 if model_name.startswith("swin") else 0.9
  assert model_names.sgd_momentum(config.optim.momentum,
                                  config.model.name) == expected_momentum
  assert config.init.source and config.init.checkpoint.startswith(str(tmp_path))
  _, tx, params, step, batch = _step_inputs(config)
  state = state_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                               jax.eval_shape(tx.init, params))
  new_state, metrics = jax.eval_shape(step, state, *batch)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(params)
  assert "loss" in metrics


def test_imagenette_swin_runs_one_training_step(tmp_path):
  # The pair that could not be built before (Swin forced to patch 16); the
  # ViT and ConViT recipes' steps run in tests/test_recipes.py and
  # tests/test_train.py.
  model, tx, _, step, batch = _step_inputs(
      _paper_config("imagenette", "swin_tiny_patch4_window7_224", tmp_path))
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  state = state_lib.TrainState(jnp.asarray(0, jnp.int32), params,
                               tx.init(params))
  compiled = step.lower(state,
                        *batch).compile({"xla_backend_optimization_level": 0})
  new_state, metrics = compiled(state, *batch)
  assert int(new_state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(new_state.params)))


# --- 4. Initialisation ------------------------------------------------------


def test_replaced_head_of_a_pretrained_model_has_the_reference_std(tmp_path):
  config = importlib.import_module("configs.cifar10").get_config(
      f"model=deit_tiny_patch16_224,pretrained_dir={tmp_path}")
  config.model.depth = 1
  model = models.create_from_config(config.model, img_size=32, num_classes=10)
  # A pre-trained file of the same body with ImageNet's 1000-class head.
  source = models.create_from_config(config.model,
                                     img_size=32,
                                     num_classes=1000)
  source_params = source.init(jax.random.key(1), jnp.zeros(
      (1, 32, 32, 3)))["params"]
  pretrained.export_timm(source_params, source, config.init.checkpoint)
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = pretrained.load(config.init.checkpoint, model, init_params=init)
  head = np.asarray(params["head"]["kernel"])
  assert head.shape == (192, 10)
  assert abs(head.std() - 0.02) < 0.002  # trunc_normal(0.02)
  assert np.all(np.asarray(params["head"]["bias"]) == 0)


@pytest.mark.parametrize("name,sizes", TINY_FAMILIES.items())
def test_weight_init_is_a_named_option_of_every_family(name, sizes):
  stds = {}
  for scheme in ("trunc_normal", "xavier_uniform"):
    model = models.create(name,
                          num_classes=10,
                          img_size=32,
                          weight_init=scheme,
                          **sizes)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(
        (1, 32, 32, 3)))["params"]
    stds[scheme] = float(np.asarray(params["head"]["kernel"]).std())
  assert abs(stds["trunc_normal"] - 0.02) < 0.004
  assert abs(stds["xavier_uniform"] - 0.02) > 0.01
  with pytest.raises(UserError):
    models.create(name, weight_init="kaiming")


# --- 5. Pre-trained by default ---------------------------------------------


def test_paper_configs_default_to_the_reference_weights(tmp_path):
  for dataset, arg in (("cifar10", ""), ("imagenette", "root=x"), ("imagenet",
                                                                   "")):
    config = importlib.import_module(f"configs.{dataset}").get_config(arg)
    assert config.init.checkpoint, dataset
  vitb = importlib.import_module("configs.cifar10").get_config(
      "model=vit_base_patch16_224")
  assert vitb.init.source == "vit_base_patch16_224.orig_in21k_ft_in1k"
  assert importlib.import_module("configs.cifar10").get_config(
      "pretrained=scratch").init.checkpoint == ""


def test_missing_pretrained_file_is_one_line_before_any_compile(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([
      sys.executable, "main.py", f"--workdir={workdir}",
      f"--config=configs/cifar10.py:model=vit_base_patch16_224,"
      f"pretrained_dir={tmp_path / 'weights'}"
  ],
                          cwd=ROOT,
                          capture_output=True,
                          text=True,
                          timeout=300,
                          env={
                              **os.environ, "JAX_LOG_COMPILES": "1",
                              "JAX_PLATFORMS": "cpu"
                          })
  assert result.returncode != 0
  errors = [l for l in result.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1, result.stderr
  line = errors[0]
  assert str(tmp_path / "weights" / "vit_base_patch16_224.safetensors") in line
  assert "vit_base_patch16_224.orig_in21k_ft_in1k" in line
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr
  assert not workdir.exists()


# --- 6. The reference's final evaluation -----------------------------------


def test_paper_configs_end_with_the_reference_evaluation():
  for dataset, arg in (("cifar10", ""), ("imagenette", "root=x"), ("imagenet",
                                                                   "")):
    config = importlib.import_module(f"configs.{dataset}").get_config(arg)
    assert set(config.eval.attacks) >= {"cw20", "pgd20", "pgd100", "aa"}
  quick = importlib.import_module("configs.quickstart").get_config()
  assert "aa" not in quick.eval.attacks


# --- 7. TRADES / MART start in normalised units -----------------------------


def test_gaussian_start_is_0_001_std_in_pixels():
  model = models.create("deit_tiny_patch16_224", num_classes=10, **TINY_VIT)
  scale = np.asarray(objectives.gaussian_start_scale(model))
  np.testing.assert_allclose(scale, 0.001 * np.array(model.std), rtol=1e-6)
  x = jnp.full((64, 32, 32, 3), 0.5)
  delta = objectives.attacks.gaussian_init(jax.random.key(0), x, scale)
  np.testing.assert_allclose(np.asarray(delta).std(axis=(0, 1, 2)),
                             scale,
                             rtol=0.02)


def test_legacy_vit_small_uses_torch_layer_norm_eps():
  model = models.create("vit_small_patch16_224_legacy")
  assert model.layer_norm_eps == 1e-5


# --- Old runs keep resuming -------------------------------------------------


def test_old_run_config_is_upgraded_to_what_it_ran():
  old = {
      "model": {
          "name": "deit_tiny_patch16_224",
          "patch_size": None
      },
      "init": {
          "checkpoint": ""
      },
      "ard": True,
      "prm": False,
      "warmup_epochs": 5.0,
      "drop_rate": 0.5
  }
  upgraded = workdir_lib.upgrade_run_config(old)
  assert upgraded["tricks"]["prm_patch_size"] == 16  # the model's own patch
  assert upgraded["model"]["weight_init"] == "xavier_uniform"
  assert "prm_patch_size" not in old  # the input is untouched
  # The tricks' settings, once top-level fields, are the `tricks` section.
  assert upgraded["tricks"] == {
      "ard": True,
      "prm": False,
      "warmup_epochs": 5.0,
      "final_keep_rate": 0.5,
      "prm_patch_size": 16
  }
  assert not {"ard", "prm", "warmup_epochs", "drop_rate"} & set(upgraded)
  assert upgraded["attack"]["name"] == "pgd"  # the only training attack then


# --- bf16 compute keeps an attack's small steps -----------------------------


@pytest.mark.parametrize("name,sizes", TINY_FAMILIES.items())
def test_bf16_patch_embedding_sees_a_quarter_level_pixel_change(name, sizes):
  x = jnp.full((1, 32, 32, 3), 0.5, jnp.float32)
  x_step = x.at[0, 5, 6, 1].add(0.25 / 255)
  change = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.create(name,
                          num_classes=10,
                          img_size=32,
                          dtype=dtype,
                          **sizes)
    params = model.init(jax.random.key(0), x)["params"]
    embed = lambda images: model.apply(  # pylint: disable=cell-var-from-loop
        {"params": params},
        images,
        capture_intermediates=True,
        mutable=["intermediates"])[1]["intermediates"]["patch_embed"]["__call__"
                                                                     ][0]
    change[dtype] = np.asarray(embed(x_step), np.float32) - np.asarray(
        embed(x), np.float32)
  assert np.abs(change[jnp.float32]).max() > 0
  np.testing.assert_allclose(change[jnp.bfloat16],
                             change[jnp.float32],
                             rtol=1e-3,
                             atol=1e-6)


def test_eval_compute_dtype_sets_the_evaluators_precision():
  from configs import quickstart
  from vitat_jax import evaluation
  config = quickstart.get_config()
  config.compute_dtype = "bfloat16"  # a run trained in bf16 ...
  model = state_lib.build_model(config)
  assert model.dtype == jnp.bfloat16
  config.eval.compute_dtype = "float32"  # ... evaluated in float32
  evaluator = evaluation.Evaluator.from_config(config, model, lambda b: b)
  assert evaluator.model.dtype == jnp.float32
  assert evaluator.model.precision == "highest"  # matmul_precision "auto"
  config.eval.compute_dtype = ""  # by default, in the run's dtype
  evaluator = evaluation.Evaluator.from_config(config, model, lambda b: b)
  assert evaluator.model.dtype == jnp.bfloat16
  assert evaluator.model.precision is None
  config.eval.compute_dtype = "fp8"
  with pytest.raises(UserError) as error:
    validate.check_config(config)
  assert "eval.compute_dtype='fp8'" in str(error.value)
  assert "\n" not in str(error.value)


def test_matmul_precision_of_training_and_evaluation():
  from configs import quickstart
  from vitat_jax import evaluation
  config = quickstart.get_config()
  config.compute_dtype = "float32"
  model = state_lib.build_model(config)
  assert model.precision is None  # "auto" on the CPU: the backend's
  evaluator = evaluation.Evaluator.from_config(config, model, lambda b: b)
  assert evaluator.model.precision == "highest"
  config.matmul_precision = "high"  # an explicit setting holds for both
  assert state_lib.build_model(config).precision == "high"
  assert evaluation.Evaluator.from_config(config, model,
                                          lambda b: b).model.precision == "high"
  config.matmul_precision = "tf32"
  with pytest.raises(UserError) as error:
    validate.check_config(config)
  assert "matmul_precision='tf32'" in str(error.value)
  assert "\n" not in str(error.value)

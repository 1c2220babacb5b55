"""AutoAttack: the sequence's invariants, the sanity checks, evaluation
wiring, and parity with the reference implementation (fra31's)."""

import importlib
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.attacks._models import assert_in_ball_and_box, batch, mlp
from vitat_jax import attack_names
from vitat_jax import attacks
from vitat_jax import data
from vitat_jax import evaluation
from vitat_jax.data import protocol
from vitat_jax.attacks.autoattack import attack_settings
from vitat_jax.errors import UserError

# Small budgets keep the CPU tests fast; the algorithms are the same.
FAST = {
    "apgd-ce": {
        "n_iter": 10
    },
    "apgd-dlr": {
        "n_iter": 10
    },
    "apgd-t": {
        "n_iter": 10,
        "n_target_classes": 3
    },
    "fab-t": {
        "n_iter": 10,
        "n_target_classes": 3
    },
    "fab": {
        "n_iter": 10
    },
    "square": {
        "n_queries": 100
    }
}
STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]


def _run(x, y, key, eps=4 / 255, names=STANDARD, logits_fn=mlp, **kwargs):
  return attacks.autoattack(logits_fn,
                            key,
                            x,
                            y,
                            eps=eps,
                            version="custom",
                            attacks_to_run=names,
                            overrides=FAST,
                            batch_size=16,
                            verbose=False,
                            **kwargs)


def test_versions_follow_the_reference():
  standard = attack_settings("standard", 8 / 255)
  assert [s.name for s in standard] == STANDARD
  assert all(s.n_restarts == 1 and s.n_iter == 100 for s in standard)
  assert standard[1].n_target_classes == 9 and standard[2].n_target_classes == 9
  assert standard[3].n_queries == 5000
  plus = {s.name: s for s in attack_settings("plus", 8 / 255)}
  assert list(plus) == [
      "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"
  ]
  assert plus["apgd-ce"].n_restarts == 5 and plus["fab"].n_restarts == 5
  assert plus["apgd-t"].n_restarts == 1 and plus["fab-t"].n_restarts == 1
  rand = attack_settings("rand", 8 / 255)
  assert [(s.name, s.eot_iter) for s in rand] == [("apgd-ce", 20),
                                                  ("apgd-dlr", 20)]


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([2 / 255, 6 / 255]))
def test_each_attack_only_removes_points_from_the_robust_set(seed, eps):
  x, y = batch(seed, n=24)
  y = y.at[:3].set((y[:3] + 1) % 10)  # three points wrong from the start
  result = _run(x, y, jax.random.key(seed), eps=eps)
  accuracies = list(result.robust_accuracy.values())
  assert accuracies == sorted(accuracies, reverse=True)
  clean = np.asarray(jnp.argmax(mlp(x), -1) == y)
  previous = clean
  for name in STANDARD:
    after = result.robust_after[name]
    assert np.all(previous[after]), name  # a subset of the previous set
    previous = after
  np.testing.assert_array_equal(previous, result.robust)
  assert_in_ball_and_box(jnp.asarray(result.adv_images), x, eps)
  # The verdicts agree with the model on the returned images.
  correct = np.asarray(jnp.argmax(mlp(result.adv_images), -1) == y)
  np.testing.assert_array_equal(correct & clean, result.robust)
  # Points not broken carry their clean image.
  np.testing.assert_array_equal(result.adv_images[result.robust],
                                np.asarray(x)[result.robust])


def test_same_key_same_result_and_batching_is_invisible_to_the_flags():
  x, y = batch(1, n=40)
  a = _run(x, y, jax.random.key(0))
  b = _run(x, y, jax.random.key(0))
  np.testing.assert_array_equal(a.adv_images, b.adv_images)
  assert a.robust_accuracy == b.robust_accuracy
  # Point i is keyed by its index: the set in two pieces (other batches,
  # other compacted robust sets) gives the same flags and images.
  halves = [
      _run(x[r], y[r], jax.random.key(0), first_index=r.start)
      for r in (slice(0, 20), slice(20, 40))
  ]
  combined = attacks.combine_results(halves)
  np.testing.assert_array_equal(combined["robust"], a.robust)
  assert combined["robust_accuracy"] == pytest.approx(a.robust_accuracy)
  np.testing.assert_allclose(np.concatenate([h.adv_images for h in halves]),
                             a.adv_images,
                             atol=1e-6)
  assert sum(combined["broken"].values()) == round(
      40 * (a.robust_accuracy["clean"] - a.accuracy))
  assert a.attacked["apgd-ce"] == round(40 * a.robust_accuracy["clean"])
  assert a.perturbation["max"] <= 4 / 255 + 1e-6 and a.perturbation["nan"] == 0
  assert 0 < a.accuracy < a.robust_accuracy["clean"]
  assert not any(a.checks[k]
                 for k in ("looks_like_probabilities", "randomized",
                           "zero_gradient_points", "square_beats_white_box"))
  assert a.warnings == []


def test_remainders_are_padded_by_at_most_a_quarter():
  aa = importlib.import_module("vitat_jax.attacks.autoattack")
  sizes = {aa.padded_size(k) for k in range(1, 1025)}
  # Four sizes per octave above the floor: few programs, little padding.
  assert len(sizes) == 1 + 4 * 7 and min(sizes) == aa.MIN_PADDED_BATCH
  for k in range(aa.MIN_PADDED_BATCH + 1, 1025):
    assert k <= aa.padded_size(k) <= 1.25 * k
  # Full batches of batch_size, a padded remainder, all a multiple of the
  # device count; every index once, padding repeats the last.
  chunks = list(aa._chunks(np.arange(239), 100, multiple=3))  # pylint: disable=protected-access
  assert [(len(c), v) for c, v in chunks] == [(102, 100), (102, 100), (42, 39)]
  assert np.array_equal(np.concatenate([c[:v] for c, v in chunks]),
                        np.arange(239))
  assert (chunks[-1][0][39:] == 238).all()


def test_masked_gradients_are_flagged():
  # Quantising the input makes every input gradient exactly zero: APGD and
  # FAB cannot move, Square (scores only) still can.
  quantised = lambda x: mlp(jnp.round(x * 4) / 4)
  x, y = batch(2, n=32, edges=False)
  y = jnp.argmax(quantised(x), -1)
  result = _run(x,
                y,
                jax.random.key(0),
                eps=16 / 255,
                names=["apgd-ce", "fab-t", "square"],
                logits_fn=quantised)
  assert result.checks["zero_gradient_points"] == 32
  assert result.checks["square_beats_white_box"]
  assert len(result.warnings) == 2
  assert any("zero loss gradient" in w for w in result.warnings)


def test_probability_outputs_and_randomness_are_flagged():
  x, y = batch(3, n=8)
  probabilities = lambda x: jax.nn.softmax(mlp(x))
  result = _run(x,
                y,
                jax.random.key(0),
                names=["apgd-ce"],
                logits_fn=probabilities)
  assert result.checks["looks_like_probabilities"]
  rng = np.random.default_rng(0)
  # Hidden randomness drawn on the host at every call.
  noisy = lambda x: mlp(x) + rng.normal(size=(10,)).astype(np.float32)
  result = _run(x, y, jax.random.key(0), names=["apgd-ce"], logits_fn=noisy)
  assert result.checks["randomized"]
  assert any("version='rand'" in w for w in result.warnings)


def test_rand_version_runs_eot_on_a_keyed_model():
  x, y = batch(4, n=8, edges=False)
  noisy = lambda x, key: mlp(x) + 0.05 * jax.random.normal(key, (10,))
  result = attacks.autoattack(noisy,
                              jax.random.key(0),
                              x,
                              y,
                              eps=4 / 255,
                              version="rand",
                              stochastic=True,
                              batch_size=8,
                              verbose=False,
                              overrides={
                                  "apgd-ce": {
                                      "n_iter": 5,
                                      "eot_iter": 3
                                  },
                                  "apgd-dlr": {
                                      "n_iter": 5,
                                      "eot_iter": 3
                                  }
                              })
  assert list(result.robust_accuracy) == ["clean", "apgd-ce", "apgd-dlr"]
  assert result.checks["randomized"] is None
  assert_in_ball_and_box(jnp.asarray(result.adv_images), x, 4 / 255)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(version="fast"), "unknown AutoAttack version"),
    (dict(attacks_to_run=["apgd-ce"]), "only used with version='custom'"),
    (dict(version="custom", attacks_to_run=["pgd"]), "bad attacks_to_run"),
    (dict(version="custom"), "needs attacks_to_run"),
    (dict(overrides={"square": {
        "p_init": 2
    }}), "cannot override"),
    (dict(overrides={"apgd-ce": {
        "n_iter": 0
    }}), "must be a positive"),
    (dict(eps=2.0), "eps=2.0"),
])
def test_bad_arguments_are_one_line_errors(kwargs, fragment):
  x, y = batch(0, n=2)
  with pytest.raises(UserError, match=fragment) as info:
    attacks.autoattack(mlp, jax.random.key(0), x, y, **kwargs)
  assert "\n" not in str(info.value)


def test_a_multi_process_call_needs_a_placement(monkeypatch):
  # Each process attacks its own rows: the runner must say how to merge.
  x, y = batch(0, n=2)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(UserError,
                     match="placement=evaluation.autoattack_"
                     "placement") as info:
    attacks.autoattack(mlp, jax.random.key(0), x, y)
  assert "\n" not in str(info.value)


def _eval_config(**changes):
  from configs import default
  config = default.get_config()
  config.eval.attacks = ("clean", "aa")
  for key, value in changes.items():
    section, *rest = key.split(".")
    target = config
    for part in [section] + rest[:-1]:
      target = target[part]
    target[rest[-1] if rest else section] = value
  return config


@pytest.mark.parametrize("changes, fragment", [
    ({
        "eval.autoattack.version": "fast"
    }, "unknown AutoAttack version"),
    ({
        "eval.autoattack.attacks": ("apgd-ce", "pgd")
    }, "bad attacks_to_run"),
    ({
        "eval.autoattack.attacks": ("apgd-ce",),
        "eval.autoattack.version": "plus"
    }, "cannot be combined"),
    ({
        "eval.eps": 1.5
    }, "in (0, 1]"),
    ({
        "eval.autoattack.norm": "L1"
    }, "unknown AutoAttack norm"),
    ({
        "eval.autoattack.norm": "L2"
    }, "implemented for L-inf only"),
    ({
        "eval.protocol": "robustbench",
        "data.name": "digits"
    }, "protocol='robustbench' is defined here for cifar10"),
    ({
        "eval.protocol": "robustbench",
        "data.tfds_name": "imagenet2012"
    }, "ImageNet"),
    ({
        "eval.protocol": "robustbench",
        "data.image_size": 224
    }, "at 32 px"),
    ({
        "eval.protocol": "leaderboard"
    }, "unknown eval.protocol"),
    ({
        "eval.protocol": "robustbench",
        "data.name": "image_folder",
        "data.image_size": 64
    }, "on ImageNet evaluates at 224 px"),
    ({
        "eval.protocol": "robustbench",
        "data.name": "image_folder",
        "data.image_size": 224,
        "eval.robustbench_preprocessing": "Res256"
    }, "use one of Res256Crop224, Res224"),
    ({
        "eval.protocol": "robustbench",
        "data.name": "image_folder",
        "data.image_size": 224,
        "eval.num_examples": 5001
    }, "the RobustBench set has 5000 images"),
])
def test_bad_autoattack_configs_fail_before_any_attack(changes, fragment):
  from vitat_jax import validate
  with pytest.raises(UserError,
                     match=fragment.replace("(",
                                            r"\(").replace(")", r"\)").replace(
                                                "[", r"\[")) as info:
    validate.check_config(_eval_config(**changes))
  assert "\n" not in str(info.value)


def test_robustbench_protocol_is_cifar10s_first_10000_test_images():
  config = _eval_config(**{"eval.protocol": "robustbench"})
  assert protocol.robustbench_num_examples(config) == 10_000
  config.eval.num_examples = 500
  assert protocol.robustbench_num_examples(config) == 500
  options = evaluation.autoattack_options(
      _eval_config(**{"eval.autoattack.attacks": ("apgd-ce", "square")}))
  assert options["version"] == "custom"
  assert options["attacks_to_run"] == ("apgd-ce", "square")


def test_robustbench_protocol_on_imagenet_reads_its_5000_files_its_way(
    tmp_path):
  # An ImageNet-shaped folder: one training image per class of the list,
  # and the 5,000 listed validation files (tiny, non-square) plus one more.
  from PIL import Image
  ids = data.robustbench_imagenet_ids()
  rng = np.random.default_rng(0)
  for wnid in sorted({i.split("/")[0] for i in ids}):
    (tmp_path / "train" / wnid).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).save(
        tmp_path / "train" / wnid / "a.png")
  for image_id in ids + [ids[0].split("/")[0] + "/extra.JPEG"]:
    path = tmp_path / "test" / image_id
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 9, 3), np.uint8)).save(path)
  config = _eval_config(
      **{
          "eval.protocol": "robustbench",
          "data.name": "image_folder",
          "data.root": str(tmp_path),
          "data.cache_dir": str(tmp_path / "cache"),
          "data.decoded_cache_mb": 0,
          "data.image_size": 224,
          "data.test_examples": 997,  # one per class; the protocol reads all
          "data.eval_transform": "squash",  # what the run trained with
      })
  from vitat_jax import validate
  validate.check_config(config)
  assert protocol.robustbench_num_examples(config) == 5000
  test = data.load(protocol.data_config(config)).test
  assert len(test) == 5000
  assert [test.path(i) for i in (0, 4999)
         ] == [str(tmp_path / "test" / ids[i]) for i in (0, 4999)]
  # Res256Crop224: the shorter side to 256, then the central 224 x 224.
  image, label = test.example(0)
  wide = Image.open(test.path(0)).convert("RGB").resize((384, 256),
                                                        Image.BILINEAR)
  np.testing.assert_array_equal(image, np.asarray(wide)[16:240, 80:304])
  assert label == sorted({i.split("/")[0] for i in ids
                         }).index(ids[0].split("/")[0])
  # Res224, RobustBench's preprocessing of this paper's models: squash.
  config.eval.robustbench_preprocessing = "Res224"
  image, _ = data.load(protocol.data_config(config)).test.example(0)
  squashed = Image.open(test.path(0)).convert("RGB").resize((224, 224),
                                                            Image.BILINEAR)
  np.testing.assert_array_equal(image, np.asarray(squashed))
  # Without the protocol the run's own test split and transform.
  config.eval.protocol = ""
  assert len(data.load(protocol.data_config(config)).test) == 997


class _Linear(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_evaluator_runs_autoattack_by_name(monkeypatch, caplog):
  # A progress line at every chance (at most every PROGRESS_EVERY_S = 30 s
  # in a run), in the plain log: a long evaluation is never silent.
  monkeypatch.setattr(evaluation, "PROGRESS_EVERY_S", 0)
  caplog.set_level(logging.INFO)
  assert attack_names.parse_attack("aa").kind == "autoattack"
  assert attack_names.parse_attack("autoattack").kind == "autoattack"
  model = _Linear()
  x, _ = batch(5, n=8)
  images = np.round(np.asarray(x) * 255).astype(np.uint8)
  x = jnp.asarray(images, jnp.float32) / 255
  params = model.init(jax.random.key(0), x)["params"]
  y = np.asarray(jnp.argmax(model.apply({"params": params}, x), -1), np.int32)
  evaluate = evaluation.Evaluator(model,
                                  eps=2 / 255,
                                  alpha=0.5 / 255,
                                  batch_size=8)
  result = evaluate(params,
                    data.ArraySource(images, y), ["clean", "pgd5", "aa"],
                    key=jax.random.key(0))
  assert result["clean_acc"] == 1.0
  assert result["aa_acc"] <= result["pgd5_acc"] + 1e-9
  assert result["num_eval_images"] == 8
  lines = [r.getMessage() for r in caplog.records]
  assert any(
      l.startswith("AutoAttack (standard) on 8 images") and
      "eval.autoattack.batch_size" in l for l in lines), lines
  assert any(
      l.startswith("AutoAttack: apgd-ce (stage 1/1) 8/8 on images 0-7")
      for l in lines), lines
  assert any(l.startswith("robust accuracy after APGD-CE") for l in lines)


@pytest.mark.slow
def test_parity_with_the_reference_autoattack():
  """Our standard AutoAttack and fra31's on the same robust model and the
  same 500 images: robust accuracy after each attack within 1 pp."""
  pytest.importorskip("torch")
  pytest.importorskip("pyautoattack")
  parity = pytest.importorskip("benchmarks.autoattack_parity")
  images, labels = parity.digits()
  params = parity.train_robust_mlp(images, labels)
  images, labels = images[:500], labels[:500]
  ours = parity.run_ours(params, images, labels)
  theirs = parity.run_reference(params, images, labels)
  assert ours["clean"] == pytest.approx(theirs["clean"], abs=1e-9)
  assert ours["square"] > 0.5  # an actually robust model
  for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
    assert abs(ours[name] - theirs[name]) <= 0.01, (name, ours, theirs)


def test_dots_only_cpu_programs_are_chosen_for_models_that_reduce():
  autoattack_module = importlib.import_module("vitat_jax.attacks.autoattack")
  x, _ = batch(0, n=4)
  normed = lambda v: jax.nn.softmax(mlp(v) / jnp.std(mlp(v), -1, keepdims=1))
  assert attacks.reduces_over_features(normed, x[:1])
  assert not attacks.reduces_over_features(mlp, x[:1])
  # This XLA takes the option; the program computes the same gradient.
  options = autoattack_module.compiler_options()
  assert options == autoattack_module.CPU_COMPILER_OPTIONS
  grad = jax.grad(lambda v: jnp.sum(jnp.log(normed(v))[:, 0]))
  np.testing.assert_allclose(jax.jit(grad, compiler_options=options)(x),
                             jax.jit(grad)(x),
                             rtol=1e-5,
                             atol=1e-6)

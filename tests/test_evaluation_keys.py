"""Every evaluation attack's randomness derives from its name alone."""

import zlib

import jax
import numpy as np
import pytest

from tests import _tiny
from vitat_jax import attack_names
from vitat_jax import data as data_lib
from vitat_jax import evaluation


def test_key_index_is_the_name_s_crc32_and_aliases_agree():
  assert attack_names.key_index("pgd20") == zlib.crc32(b"pgd20") & 0x7FFFFFFF
  assert attack_names.key_index("aa") == attack_names.key_index("autoattack")
  names = [
      "clean", "pgd20", "pgd100", "cw20", "aa", "apgd-ce", "apgd-t", "fab-t",
      "square", "apgd-dlr", "fab", "apgd-ce-4"
  ]
  indices = [attack_names.key_index(n) for n in names[:-1]]
  assert len(set(indices)) == len(indices)  # no two attacks share a key
  assert all(0 <= i < 2**31 for i in indices)


def _keys_seen(monkeypatch, names):
  """{attack: [key data per batch]} an evaluation of `names` hands out."""
  seen = {}

  def fake_batch_fn(self, spec, with_images=False):
    del self, with_images

    def correct(params, key, images, labels):
      del params, images
      seen.setdefault(spec.name,
                      []).append(np.asarray(jax.random.key_data(key)).tolist())
      return np.ones(len(labels), bool)

    return correct

  def fake_autoattack(self, params, source, spec, count, key, output_dir):
    del self, params, source, output_dir
    seen.setdefault(spec.name,
                    []).append(np.asarray(jax.random.key_data(key)).tolist())
    return {"num_eval_images": count, f"{spec.name}_acc": 1.0}

  monkeypatch.setattr(evaluation.Evaluator, "_batch_fn", fake_batch_fn)
  monkeypatch.setattr(evaluation.Evaluator, "_run_autoattack", fake_autoattack)
  evaluator = evaluation.Evaluator(_tiny.model(),
                                   eps=8 / 255,
                                   alpha=2 / 255,
                                   batch_size=16)
  source = data_lib.load(_tiny.config().data).test
  evaluator(None, source, names, key=jax.random.key(7), num_examples=48)
  return seen


@pytest.mark.parametrize("names", [
    ["pgd20", "cw20", "aa"],
    ["aa", "cw20", "clean", "pgd20"],
    ["cw20", "pgd20", "aa", "pgd100"],
])
def test_an_attack_draws_the_same_whatever_list_it_is_in(monkeypatch, names):
  reference = _keys_seen(monkeypatch, ["pgd20", "cw20", "aa"])
  seen = _keys_seen(monkeypatch, names)
  for name in ("pgd20", "cw20", "aa"):
    assert seen[name] == reference[name], name
  # Batch b of attack `name`: fold_in(fold_in(key, key_index(name)), b).
  key = jax.random.key(7)
  for b, drawn in enumerate(seen["pgd20"]):
    expected = jax.random.fold_in(
        jax.random.fold_in(key, attack_names.key_index("pgd20")), b)
    assert drawn == np.asarray(jax.random.key_data(expected)).tolist()
  assert len(seen["pgd20"]) == 3  # 48 images, batches of 16
  assert seen["pgd20"] != seen["cw20"]


def test_pgd_and_cw_save_the_points_they_broke(tmp_path):
  model = _tiny.model()
  params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3),
                                                  np.float32))["params"]
  evaluator = evaluation.Evaluator(model,
                                   eps=16 / 255,
                                   alpha=4 / 255,
                                   batch_size=16,
                                   save_adversarial=True)
  source = data_lib.load(_tiny.config().data).test
  result = evaluator(params,
                     source, ["clean", "pgd2"],
                     key=jax.random.key(0),
                     num_examples=48,
                     output_dir=str(tmp_path))
  saved = np.load(tmp_path / "adversarial" / "pgd2.npz")
  assert sorted(saved.files) == ["eps", "images", "indices", "labels", "norm"]
  broken = len(saved["indices"])
  # The points PGD broke: correct when clean, wrong after the attack.
  assert broken == round(48 * (result["clean_acc"] - result["pgd2_acc"]))
  clean, labels = source.get_batch(saved["indices"])
  np.testing.assert_array_equal(labels, saved["labels"])
  clean = clean.astype(np.float32) / 255
  assert np.abs(saved["images"] - clean).max() <= 16 / 255 + 1e-6
  logits = model.apply({"params": params}, saved["images"])
  assert not np.any(np.argmax(logits, -1) == saved["labels"])
  assert not (tmp_path / "adversarial" / "clean.npz").exists()


def test_evaluation_ships_uint8_images_and_converts_them_on_the_device():
  model = _tiny.model()
  params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3),
                                                  np.float32))["params"]
  shipped = []

  def shard(batch):
    shipped.append(batch[0].dtype)
    return batch

  evaluator = evaluation.Evaluator(model,
                                   eps=8 / 255,
                                   alpha=2 / 255,
                                   batch_size=16,
                                   shard_fn=shard)
  source = data_lib.load(_tiny.config().data).test
  result = evaluator(params,
                     source, ["clean"],
                     key=jax.random.key(0),
                     num_examples=32)
  assert shipped == [np.uint8, np.uint8]
  images, labels = source.get_batch(np.arange(32))
  logits = model.apply({"params": params}, images.astype(np.float32) / 255)
  assert result["clean_acc"] == np.mean(np.argmax(logits, -1) == labels)

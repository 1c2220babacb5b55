"""Sources: digits, image folders (with cache) and tfds, behind `load`."""

import os
import pathlib
import shutil
import types

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from vitat_jax import data
from vitat_jax.data import sources
from vitat_jax.errors import UserError


def _config(**fields):
  return ml_collections.ConfigDict(fields)


def _assert_one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def _assert_split(source, size, length=None):
  images, labels = source.get_batch(np.arange(len(source)))
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  assert images.shape == (len(source), size, size, 3)
  if length is not None:
    assert len(source) == length
  return images, labels


# ----------------------------------------------------------------- digits ---


def test_digits_default_split_shapes_and_range():
  splits = data.load(_config(name="digits", image_size=0))
  assert splits.image_size == 16 and splits.num_classes == 10
  assert splits.class_names == tuple("0123456789")
  assert splits.mean == (0.5, 0.5, 0.5) and splits.std == (0.5, 0.5, 0.5)
  train_images, train_labels = _assert_split(splits.train, 16, 1437)
  _, test_labels = _assert_split(splits.test, 16, 360)
  assert train_images.min() == 0 and train_images.max() == 255
  assert set(np.unique(train_labels)) == set(range(10))
  assert set(np.unique(test_labels)) == set(range(10))
  # Grey digits: all three channels are the same picture.
  assert (train_images[..., 0] == train_images[..., 2]).all()


def test_digits_split_follows_the_fixed_permutation():
  digits = sk_datasets.load_digits()
  order = np.random.default_rng(0).permutation(1797)
  splits = data.load(_config(name="digits", image_size=8))
  train_order, test_order = order[:1437], order[1437:]
  np.testing.assert_array_equal(splits.train.labels, digits.target[train_order])
  np.testing.assert_array_equal(splits.test.labels, digits.target[test_order])
  expected = np.round(digits.images[test_order] * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(splits.test.images[..., 1], expected)


def test_digits_upsampling_repeats_pixels_for_integer_factors():
  native = data.load(_config(name="digits", image_size=8)).train.images
  doubled = data.load(_config(name="digits", image_size=16)).train.images
  np.testing.assert_array_equal(doubled, native.repeat(2, 1).repeat(2, 2))


def test_digits_other_sizes_are_resized_bilinearly():
  splits = data.load(_config(name="digits", image_size=12))
  images, _ = _assert_split(splits.train, 12, 1437)
  assert splits.image_size == 12
  # Bilinear interpolation creates grey levels between the 17 native ones.
  assert len(np.unique(images)) > 17


def test_digits_is_deterministic():
  first = data.load(_config(name="digits"))
  second = data.load(_config(name="digits"))
  np.testing.assert_array_equal(first.train.images, second.train.images)
  np.testing.assert_array_equal(first.test.labels, second.test.labels)


def test_digits_subsets_are_class_balanced_and_seeded():
  full = data.load(_config(name="digits"))
  subset = data.load(
      _config(name="digits",
              train_examples=100,
              test_examples=50,
              subset_seed=3))
  np.testing.assert_array_equal(np.bincount(subset.train.labels), [10] * 10)
  np.testing.assert_array_equal(np.bincount(subset.test.labels), [5] * 10)
  # Every chosen example is one of the full split's.
  full_rows = {row.tobytes() for row in full.train.images}
  assert all(row.tobytes() in full_rows for row in subset.train.images)
  again = data.load(_config(name="digits", train_examples=100, subset_seed=3))
  other = data.load(_config(name="digits", train_examples=100, subset_seed=4))
  np.testing.assert_array_equal(again.train.images, subset.train.images)
  assert not np.array_equal(other.train.images, subset.train.images)
  assert len(again.test) == 360


def test_config_may_be_any_attribute_object_with_fields_missing():
  splits = data.load(types.SimpleNamespace(name="digits", mean=None))
  assert splits.image_size == 16 and len(splits.train) == 1437


def test_the_fields_load_reads_are_the_config_data_section():
  from configs import default
  assert set(sources.FIELDS) == set(default.get_config().data.keys())


def test_mean_and_std_overrides():
  splits = data.load(_config(name="digits", mean=(0.1, 0.2, 0.3), std=[1, 2,
                                                                       3]))
  assert splits.mean == (0.1, 0.2, 0.3) and splits.std == (1.0, 2.0, 3.0)
  assert data.load(_config(name="digits", mean=(), std=())).mean == (0.5,) * 3


@pytest.mark.parametrize("fields, fragments", [
    (dict(name="imagenet"), ("'imagenet'", "digits, image_folder, tfds")),
    (dict(name="digits", image_size=-1), ("data.image_size", "-1")),
    (dict(name="digits", train_examples=5), ("data.train_examples=5",)),
    (dict(name="digits", mean=(0.5, 0.5)), ("data.mean", "3 numbers")),
    (dict(name="digits", std=(0.5, 0.0, 0.5)), ("data.std",)),
    (dict(name="image_folder"), ("data.root",)),
    (dict(name="tfds"), ("data.tfds_name",)),
])
def test_bad_configs_are_user_errors(fields, fragments):
  with pytest.raises(UserError) as excinfo:
    data.load(_config(**fields))
  _assert_one_line_error(excinfo, *fragments)


# ----------------------------------------------------------- image folder ---


def _random_image(rng, size=8):
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _make_folder(root: pathlib.Path,
                 per_class: dict,
                 split="train",
                 size=8,
                 seed=0) -> dict:
  """Writes per_class[name] images per class, alternating PNG and JPEG.

  Returns {class name: [the PNG images' arrays]} (PNG is lossless).
  """
  rng = np.random.default_rng(seed)
  pngs = {}
  for class_name, count in per_class.items():
    class_dir = root / split / class_name
    class_dir.mkdir(parents=True, exist_ok=True)
    (class_dir / "notes.txt").write_text("not an image")
    pngs[class_name] = []
    for i in range(count):
      image = _random_image(rng, size)
      if i % 2 == 0:
        Image.fromarray(image).save(class_dir / f"{i:03d}.png")
        pngs[class_name].append(image)
      else:
        Image.fromarray(image).save(class_dir / f"{i:03d}.JPEG", quality=95)
  return pngs


def _make_dataset(root: pathlib.Path, train=None, test=None, size=8):
  train = train or {"zebra": 4, "apple": 3, "mango": 2}
  test = test or {name: 2 for name in train}
  return (_make_folder(root, train, "train", size,
                       seed=1), _make_folder(root, test, "test", size, seed=2))


def _folder_config(root, cache_dir, **fields):
  return _config(name="image_folder",
                 root=str(root),
                 cache_dir=str(cache_dir),
                 **fields)


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
  train_pngs, _ = _make_dataset(tmp_path / "pets")
  splits = data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  assert splits.class_names == ("apple", "mango", "zebra")
  assert splits.num_classes == 3 and splits.image_size == 8
  assert splits.mean == sources.IMAGENET_STATS[0]
  images, labels = _assert_split(splits.train, 8, 9)
  _assert_split(splits.test, 8, 6)
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 2, 2, 2])
  # Files are read in sorted order; the PNGs (000, 002, ...) come back exact.
  np.testing.assert_array_equal(images[0], train_pngs["apple"][0])
  np.testing.assert_array_equal(images[2], train_pngs["apple"][1])
  np.testing.assert_array_equal(images[5], train_pngs["zebra"][0])


def test_image_folder_resizes_and_subsets(tmp_path):
  _make_dataset(tmp_path / "pets", train={"a": 6, "b": 5}, size=8)
  splits = data.load(
      _folder_config(tmp_path / "pets",
                     tmp_path / "cache",
                     image_size=12,
                     train_examples=4))
  assert splits.image_size == 12
  _, labels = _assert_split(splits.train, 12, 4)
  np.testing.assert_array_equal(np.bincount(labels), [2, 2])
  _assert_split(splits.test, 12, 4)


def test_image_folder_stats_come_from_the_config_not_its_name(tmp_path):
  root = tmp_path / "cifar10-something"
  _make_dataset(root)
  cache = tmp_path / "cache"
  for stats, expected in (("imagenet", sources.IMAGENET_STATS),
                          ("", sources.IMAGENET_STATS),
                          ("cifar100", sources.CIFAR100_STATS)):
    splits = data.load(_folder_config(root, cache, stats=stats))
    assert (splits.mean, splits.std) == expected, stats
  # A folder of any name gets the config's; data.mean / std win over stats.
  _make_dataset(tmp_path / "pets")
  splits = data.load(
      _folder_config(tmp_path / "pets",
                     cache,
                     stats="cifar10",
                     mean=(0.1, 0.2, 0.3)))
  assert splits.mean == (0.1, 0.2, 0.3)
  assert splits.std == sources.CIFAR10_STATS[1]
  with pytest.raises(UserError, match="data.stats='svhn'"):
    data.load(_folder_config(tmp_path / "pets", cache, stats="svhn"))


def test_image_folder_second_load_reads_the_cache(tmp_path, monkeypatch):
  _make_dataset(tmp_path / "pets")
  config = _folder_config(tmp_path / "pets", tmp_path / "cache")
  first = data.load(config)
  cache_files = sorted((tmp_path / "cache" / "image_folder").iterdir())
  # An index and the decoded images per split, no temp files.
  assert [p.suffix for p in cache_files] == [".npz"] * 4
  assert sum("-index-" in p.name for p in cache_files) == 2

  def no_decoding(*args, **kwargs):
    raise AssertionError("the cached folder was decoded again")

  monkeypatch.setattr(Image, "open", no_decoding)
  second = data.load(config)
  np.testing.assert_array_equal(first.train.images, second.train.images)
  np.testing.assert_array_equal(first.test.labels, second.test.labels)

  # A changed file list is a different cache entry.
  monkeypatch.undo()
  Image.fromarray(_random_image(np.random.default_rng(9))).save(
      tmp_path / "pets" / "train" / "apple" / "new.png")
  assert len(data.load(config).train) == len(first.train) + 1


def test_unreadable_cache_is_rebuilt(tmp_path):
  _make_dataset(tmp_path / "pets")
  config = _folder_config(tmp_path / "pets", tmp_path / "cache")
  first = data.load(config)
  for path in (tmp_path / "cache" / "image_folder").iterdir():
    path.write_bytes(b"garbage")
  np.testing.assert_array_equal(
      data.load(config).train.images, first.train.images)


def test_few_corrupt_files_are_skipped_with_a_warning(tmp_path, caplog):
  _make_dataset(tmp_path / "pets", train={"a": 50, "b": 50})
  (tmp_path / "pets" / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
  splits = data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  assert len(splits.train) == 100
  assert "Skipped 1 of 101 image files" in caplog.text


def test_many_corrupt_files_are_a_user_error(tmp_path):
  _make_dataset(tmp_path / "pets", train={"a": 10, "b": 10})
  for name in ("x.png", "y.jpg"):
    (tmp_path / "pets" / "train" / "a" / name).write_bytes(b"\x89PNG junk")
  with pytest.raises(UserError) as excinfo:
    data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  _assert_one_line_error(excinfo, "more than 1%", str(tmp_path / "pets"))


def test_missing_root_is_a_user_error(tmp_path):
  with pytest.raises(UserError) as excinfo:
    data.load(_folder_config(tmp_path / "nowhere", tmp_path / "cache"))
  _assert_one_line_error(excinfo, str(tmp_path / "nowhere"))


def test_missing_test_folder_is_a_user_error(tmp_path):
  _make_folder(tmp_path / "pets", {"a": 2})
  with pytest.raises(UserError) as excinfo:
    data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  _assert_one_line_error(excinfo, str(tmp_path / "pets" / "test"))


@pytest.mark.parametrize("layout", ["no_class_folders", "no_images"])
def test_empty_folder_is_a_user_error(tmp_path, layout):
  for split in ("train", "test"):
    (tmp_path / "pets" / split).mkdir(parents=True)
    if layout == "no_images":
      (tmp_path / "pets" / split / "cat").mkdir()
      (tmp_path / "pets" / split / "cat" / "readme.txt").write_text("hi")
  with pytest.raises(UserError) as excinfo:
    data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  _assert_one_line_error(excinfo, str(tmp_path / "pets" / "train"))


def test_different_test_classes_are_a_user_error(tmp_path):
  _make_dataset(tmp_path / "pets",
                train={
                    "a": 2,
                    "b": 2
                },
                test={
                    "a": 2,
                    "c": 2
                })
  with pytest.raises(UserError) as excinfo:
    data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  _assert_one_line_error(excinfo, "b, c")


def test_mixed_native_sizes_need_image_size(tmp_path):
  _make_dataset(tmp_path / "pets", size=8)
  Image.fromarray(_random_image(np.random.default_rng(0), 10)).save(
      tmp_path / "pets" / "train" / "zebra" / "zz.png")
  config = _folder_config(tmp_path / "pets", tmp_path / "cache")
  with pytest.raises(UserError) as excinfo:
    data.load(config)
  _assert_one_line_error(excinfo, "zz.png", "data.image_size")
  config.image_size = 8
  assert data.load(config).image_size == 8


def test_real_cifar10_folder(cifar10_root, tmp_path):
  splits = data.load(
      _folder_config(cifar10_root,
                     tmp_path / "cache",
                     train_examples=100,
                     stats="cifar10"))
  assert splits.class_names == ("airplane", "automobile", "bird", "cat", "deer",
                                "dog", "frog", "horse", "ship", "truck")
  assert splits.image_size == 32
  assert (splits.mean, splits.std) == sources.CIFAR10_STATS
  _, train_labels = _assert_split(splits.train, 32, 100)
  np.testing.assert_array_equal(np.bincount(train_labels), [10] * 10)
  test_images, test_labels = _assert_split(splits.test, 32, 10_000)
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
  # Real photographs: the channel means are CIFAR-10's published ones.
  channel_means = test_images.reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(channel_means, sources.CIFAR10_STATS[0], atol=0.01)


# ------------------------------------------------------------------- tfds ---


class VitatTestTinyGray(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) grayscale dataset, written without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  NUM_EXAMPLES = {"train": 30, "test": 9}

  def _info(self):
    # A Tensor feature, as encoding an Image feature would need TensorFlow.
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["low", "mid", "high"]),
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.NUM_EXAMPLES}

  def _generate_examples(self, split):
    for i in range(self.NUM_EXAMPLES[split]):
      label = i % 3
      # The label is readable from the pixels, to check records stay paired.
      image = np.full((6, 6, 1), 40 + 80 * label, np.uint8)
      yield f"{split}{i}", {"image": image, "label": label}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  VitatTestTinyGray(data_dir=str(data_dir),
                    file_format="array_record").download_and_prepare()
  return data_dir


def _tfds_config(**fields):
  return _config(
      **{
          "name": "tfds",
          "tfds_data_dir": "",
          "train_split": "train",
          "test_split": "test",
          **fields
      })


def test_tfds_mock_cifar10_through_load():
  with tfds.testing.mock_data(num_examples=20):
    splits = data.load(_tfds_config(tfds_name="cifar10"))
    assert splits.num_classes == 10 and len(splits.class_names) == 10
    assert splits.image_size == 32
    assert (splits.mean, splits.std) == sources.CIFAR10_STATS
    assert isinstance(splits.train, data.TfdsSource)
    images, labels = _assert_split(splits.train, 32, 20)
    assert labels.min() >= 0 and labels.max() < 10
    again, _ = splits.train.get_batch(np.arange(20))
    np.testing.assert_array_equal(images, again)
    _assert_split(splits.test, 32, 20)

    resized = data.load(_tfds_config(tfds_name="cifar10", image_size=16))
    _assert_split(resized.test, 16, 20)


def test_tfds_real_array_record_dataset(tiny_tfds_dir):
  splits = data.load(
      _tfds_config(tfds_name="vitat_test_tiny_gray",
                   tfds_data_dir=str(tiny_tfds_dir)))
  assert splits.class_names == ("low", "mid", "high")
  assert splits.image_size == 6
  assert splits.mean == sources.IMAGENET_STATS[0]
  images, labels = _assert_split(splits.train, 6, 30)
  _assert_split(splits.test, 6, 9)
  np.testing.assert_array_equal(images[:, 0, 0, :],
                                np.repeat(40 + 80 * labels[:, None], 3, 1))

  subset = data.load(
      _tfds_config(tfds_name="vitat_test_tiny_gray",
                   tfds_data_dir=str(tiny_tfds_dir),
                   image_size=12,
                   train_examples=12))
  images, labels = _assert_split(subset.train, 12, 12)
  np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
  # Flat images stay flat through the bilinear resize.
  np.testing.assert_array_equal(images[:, 5, 7, 1], 40 + 80 * labels)


def test_tfds_source_survives_pickling_into_a_worker(tiny_tfds_dir):
  # grain's workers receive the source by (cloud)pickle.
  import cloudpickle
  splits = data.load(
      _tfds_config(tfds_name="vitat_test_tiny_gray",
                   tfds_data_dir=str(tiny_tfds_dir),
                   image_size=8))
  copy = cloudpickle.loads(cloudpickle.dumps(splits.train))
  for index in (0, 7):
    expected, label = splits.train.example(index)
    image, copied_label = copy.example(index)
    np.testing.assert_array_equal(image, expected)
    assert label == copied_label


def test_tfds_unprepared_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError) as excinfo:
    data.load(
        _tfds_config(tfds_name="cifar10",
                     tfds_data_dir=str(tmp_path / "empty")))
  _assert_one_line_error(excinfo, "tfds build cifar10", "image_folder",
                         str(tmp_path / "empty"))


def test_tfds_unknown_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError) as excinfo:
    data.load(
        _tfds_config(tfds_name="no_such_dataset_xyz",
                     tfds_data_dir=str(tmp_path)))
  _assert_one_line_error(excinfo, "no_such_dataset_xyz", "data.tfds_name")


def test_tfds_truncated_array_record_file_is_a_user_error_at_load(
    tiny_tfds_dir, tmp_path):
  # Found when the data is listed, not in the evaluation after compiling.
  data_dir = tmp_path / "tfds"
  shutil.copytree(tiny_tfds_dir, data_dir)
  (test_file,) = data_dir.glob("vitat_test_tiny_gray/*/*-test.array_record*")
  test_file.write_bytes(test_file.read_bytes()[:test_file.stat().st_size // 2])
  with pytest.raises(UserError) as excinfo:
    data.load(
        _tfds_config(tfds_name="vitat_test_tiny_gray",
                     tfds_data_dir=str(data_dir)))
  _assert_one_line_error(excinfo, "split 'test'", "truncated", "tfds build")


def test_tfds_unknown_split_is_a_user_error(tiny_tfds_dir):
  with pytest.raises(UserError) as excinfo:
    data.load(
        _tfds_config(tfds_name="vitat_test_tiny_gray",
                     tfds_data_dir=str(tiny_tfds_dir),
                     test_split="val"))
  _assert_one_line_error(excinfo, "'val'", "data.train_split/test_split")


def test_the_test_split_alone_never_opens_the_train_split(
    tiny_tfds_dir, tmp_path):
  """Evaluation's `load(..., train=False)`: a train split that does not
  exist is never asked for (tfds split, folder train/), and `train` is
  None."""
  tfds_splits = data.load(_tfds_config(tfds_name="vitat_test_tiny_gray",
                                       tfds_data_dir=str(tiny_tfds_dir),
                                       train_split="no_such_split"),
                          train=False)
  assert tfds_splits.train is None and tfds_splits.num_classes == 3
  _assert_split(tfds_splits.test, 6)
  for c in ("a", "b"):
    os.makedirs(tmp_path / "only_test" / "test" / c)
    Image.new("RGB", (5, 5)).save(tmp_path / "only_test" / "test" / c / "x.png")
  folder_splits = data.load(_config(name="image_folder",
                                    root=str(tmp_path / "only_test"),
                                    cache_dir=str(tmp_path / "cache")),
                            train=False)
  assert folder_splits.train is None and folder_splits.image_size == 5
  assert folder_splits.class_names == ("a", "b")
  with pytest.raises(UserError, match="train is missing"):
    data.load(
        _config(name="image_folder",
                root=str(tmp_path / "only_test"),
                cache_dir=str(tmp_path / "cache")))
  assert data.load(_config(name="digits"), train=False).train is None


def test_array_source_checks_its_arrays():
  labels = np.arange(4, dtype=np.int32)
  with pytest.raises(ValueError, match="uint8"):
    data.ArraySource(np.zeros((4, 2, 2, 3), np.float32), labels)
  with pytest.raises(ValueError, match="do not match"):
    data.ArraySource(np.zeros((3, 2, 2, 3), np.uint8), labels)
  source = data.ArraySource(np.zeros((4, 2, 2, 3), np.uint8), labels)
  images, batch_labels = source.get_batch(np.array([3, 1]))
  assert images.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(batch_labels, [3, 1])


# ------------------------------------------------- image folder, read lazily ---


def _lazy_config(root, cache_dir, **fields):
  return _folder_config(root, cache_dir, decoded_cache_mb=0, **fields)


def test_lazy_folder_reads_file_by_file_like_the_decoded_cache(tmp_path):
  _make_dataset(tmp_path / "pets")
  cached = data.load(_folder_config(tmp_path / "pets", tmp_path / "cache"))
  lazy = data.load(_lazy_config(tmp_path / "pets", tmp_path / "cache"))
  assert isinstance(cached.train, data.ArraySource)
  assert isinstance(lazy.train, data.FileSource)
  assert isinstance(lazy.test, data.FileSource)
  assert lazy.image_size == 8 and lazy.class_names == cached.class_names
  for split in ("train", "test"):
    a, b = getattr(cached, split), getattr(lazy, split)
    images, labels = b.get_batch(np.arange(len(b)))
    np.testing.assert_array_equal(images, a.images)
    np.testing.assert_array_equal(labels, a.labels)


def test_lazy_folder_converts_gray_cmyk_rgba_and_palette(tmp_path):
  _make_dataset(tmp_path / "pets", train={"a": 2, "b": 2})
  rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), np.uint8)
  class_dir = tmp_path / "pets" / "train" / "a"
  Image.fromarray(rgb[..., 0]).save(class_dir / "gray.png")
  Image.fromarray(rgb).convert("CMYK").save(class_dir / "cmyk.jpg")
  rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], -1)
  Image.fromarray(rgba).save(class_dir / "rgba.png")
  Image.fromarray(rgb).convert("P").save(class_dir / "palette.png")
  splits = data.load(_lazy_config(tmp_path / "pets", tmp_path / "cache"))
  names = [
      pathlib.Path(splits.train.path(i)).name for i in range(len(splits.train))
  ]
  images = {n: splits.train.example(i)[0] for i, n in enumerate(names)}
  for name in ("gray.png", "cmyk.jpg", "rgba.png", "palette.png"):
    assert images[name].shape == (8, 8, 3) and images[name].dtype == np.uint8
  np.testing.assert_array_equal(images["gray.png"],
                                np.repeat(rgb[..., :1], 3, axis=-1))
  np.testing.assert_array_equal(images["rgba.png"], rgb)
  # CMYK JPEG round trip: lossy, but the same picture.
  assert np.abs(images["cmyk.jpg"].astype(int) - rgb).mean() < 12


def test_lazy_folder_replaces_a_file_that_breaks_while_decoding(
    tmp_path, caplog):
  _make_dataset(tmp_path / "pets", train={"a": 2, "b": 2})
  broken = tmp_path / "pets" / "train" / "a" / "broken.jpg"
  Image.fromarray(
      np.random.default_rng(0).integers(0, 256, (64, 64, 3),
                                        np.uint8)).save(broken, quality=90)
  # A valid header (the index accepts it) with the image data cut off.
  broken.write_bytes(broken.read_bytes()[:2000])
  splits = data.load(
      _lazy_config(tmp_path / "pets", tmp_path / "cache", image_size=8))
  assert len(splits.train) == 5
  index = [splits.train.path(i) for i in range(5)].index(str(broken))
  image, label = splits.train.example(index)
  # Replaced by the next file, deterministically.
  expected, expected_label = splits.train.example(index + 1)
  np.testing.assert_array_equal(image, expected)
  assert label == expected_label
  assert "does not decode" in caplog.text and str(broken) in caplog.text


def test_empty_class_folder_is_refused_in_train_and_logged_in_test(
    tmp_path, caplog):
  _make_dataset(tmp_path / "pets",
                train={
                    "a": 2,
                    "b": 2,
                    "c": 2
                },
                test={
                    "a": 2,
                    "b": 2
                })
  (tmp_path / "pets" / "test" / "c").mkdir()
  splits = data.load(_lazy_config(tmp_path / "pets", tmp_path / "cache"))
  assert splits.class_names == ("a", "b", "c") and splits.num_classes == 3
  assert "holds no" in caplog.text and "c" in caplog.text
  (tmp_path / "pets" / "train" / "empty").mkdir()
  (tmp_path / "pets" / "test" / "empty").mkdir()
  with pytest.raises(UserError, match="has no"):
    data.load(_lazy_config(tmp_path / "pets", tmp_path / "cache"))


def test_transforms_give_the_configured_size_and_are_seeded(tmp_path):
  _make_dataset(tmp_path / "pets", size=20)
  splits = data.load(
      _lazy_config(tmp_path / "pets",
                   tmp_path / "cache",
                   image_size=12,
                   train_transform="random_resized_crop",
                   eval_transform="resize_center_crop"))
  rng = lambda: np.random.default_rng(5)
  first, _ = splits.train.example(0, rng())
  again, _ = splits.train.example(0, rng())
  other, _ = splits.train.example(0, np.random.default_rng(6))
  assert first.shape == (12, 12, 3)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert splits.train.needs_rng and not splits.test.needs_rng
  # Resize(12 / 0.875 = 14) then the central 12x12.
  image, _ = splits.test.example(0)
  full = Image.open(splits.test.path(0)).convert("RGB").resize((14, 14),
                                                               Image.BILINEAR)
  np.testing.assert_array_equal(image, np.asarray(full)[1:13, 1:13])


def test_random_resized_crop_box_follows_scale_and_ratio():
  from vitat_jax.data import decode
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = decode.random_resized_crop_box(
        500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
    assert 0.07 <= w * h / (500 * 375) <= 1.0
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_jpeg_draft_decodes_big_images_at_reduced_size_exactly_enough(tmp_path):
  from vitat_jax.data import decode
  rng = np.random.default_rng(0)
  smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(
      (800, 600), Image.BICUBIC)
  smooth.save(tmp_path / "big.jpg", quality=95)
  fast = decode.Transform("squash", 64)(str(tmp_path / "big.jpg"))
  full = np.asarray(
      Image.open(tmp_path / "big.jpg").convert("RGB").resize((64, 64),
                                                             Image.BILINEAR))
  assert fast.shape == (64, 64, 3)
  assert np.abs(fast.astype(int) - full).mean() < 2


def test_robustbench_subset(tmp_path):
  ids = data.robustbench_imagenet_ids()
  assert len(ids) == 5000 and len(set(ids)) == 5000
  assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"
  # A random sample: 997 of the 1000 classes appear in it.
  assert len({i.split("/")[0] for i in ids}) == 997
  # A folder with only some of them: a one-line error naming a missing file.
  _make_dataset(tmp_path / "inet", train={"n01440764": 2, "n09468604": 2})
  with pytest.raises(UserError) as excinfo:
    data.load(
        _lazy_config(tmp_path / "inet",
                     tmp_path / "cache",
                     eval_subset="robustbench"))
  _assert_one_line_error(excinfo, "ILSVRC2012_val_", "robustbench")


@pytest.mark.parametrize("fields, fragments", [
    (dict(workers=-1), ("data.workers=-1",)),
    (dict(train_transform="crop"), ("data.train_transform", "squash")),
    (dict(eval_transform="random_resized_crop"),
     ("data.eval_transform", "resize_center_crop")),
    (dict(crop_pct=0.0), ("data.crop_pct",)),
    (dict(eval_subset="robustbench"), ("image_folder",)),
    (dict(train_transform="random_resized_crop", image_size=0),
     ("data.image_size",)),
])
def test_bad_data_fields_are_one_line_errors(fields, fragments):
  with pytest.raises(UserError) as excinfo:
    data.load(_config(name="digits", **fields))
  _assert_one_line_error(excinfo, *fragments)


def test_tfds_dir_without_array_record_files_names_the_format(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_no_ar")
  VitatTestTinyGray(data_dir=str(data_dir),
                    file_format="array_record").download_and_prepare()
  for path in data_dir.rglob("*array_record*"):
    path.unlink()
  with pytest.raises(UserError) as excinfo:
    data.load(
        _tfds_config(tfds_name="vitat_test_tiny_gray",
                     tfds_data_dir=str(data_dir)))
  _assert_one_line_error(excinfo, "--file_format=array_record")


def test_tfds_eval_subsets_are_stratified_from_labels_alone(tiny_tfds_dir):
  # tfds shuffles the records: the first 6 are two of each class only by
  # luck; the subset is by construction.
  from vitat_jax.data import subsets
  import cloudpickle
  splits = data.load(
      _tfds_config(tfds_name="vitat_test_tiny_gray",
                   tfds_data_dir=str(tiny_tfds_dir)))
  np.testing.assert_array_equal(splits.test.labels,
                                splits.test.get_batch(np.arange(9))[1])
  subset, text = subsets.first_examples(splits.test, 6, seed=0)
  assert text == ("stratified subset of 6 of 9 test images, 2 per class, "
                  "seed 0")
  images, labels = subset.get_batch(np.arange(6))
  np.testing.assert_array_equal(np.bincount(labels), [2, 2, 2])
  np.testing.assert_array_equal(images[:, 0, 0, 0], 40 + 80 * labels)
  copy = cloudpickle.loads(cloudpickle.dumps(subset))  # into a worker
  np.testing.assert_array_equal(copy.get_batch(np.arange(6))[1], labels)
  # A train subset's labels are its own records'.
  subset_splits = data.load(
      _tfds_config(tfds_name="vitat_test_tiny_gray",
                   tfds_data_dir=str(tiny_tfds_dir),
                   train_examples=12))
  np.testing.assert_array_equal(subset_splits.train.labels,
                                subset_splits.train.get_batch(np.arange(12))[1])

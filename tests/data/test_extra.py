"""Extra training data (`data.extra`): the exact share of every batch, rows
that are a function of (seed, step), resume, per-process rows, the .npz and
folder formats, and one-line errors."""

import itertools
import pathlib
import pickle

import ml_collections
import numpy as np
from PIL import Image
import pytest

from vitat_jax import data
from vitat_jax.data import extra as extra_lib
from vitat_jax.data import pipeline
from vitat_jax.errors import UserError

# Extra examples carry labels from EXTRA_LABEL on and pixel value 255; main
# examples label i and pixel i % 200: a batch names each row and its set.
EXTRA_LABEL = 1000


def _main(num_examples: int) -> data.ArraySource:
  ids = np.arange(num_examples)
  images = np.broadcast_to((ids % 200).astype(np.uint8)[:, None, None, None],
                           (num_examples, 2, 2, 3)).copy()
  return data.ArraySource(images, ids.astype(np.int32))


def _extra(num_examples: int) -> data.ArraySource:
  return data.ArraySource(np.full((num_examples, 2, 2, 3), 255, np.uint8),
                          EXTRA_LABEL + np.arange(num_examples, dtype=np.int32))


class _Noisy:
  """`source` with a random transform: pixels plus an offset drawn from
  `rng`, so a batch shows its transform's random numbers too."""

  needs_rng = True

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def example(self, index, rng=None):
    image, label = self.source.example(index)
    noise = int(rng.integers(0, 50))
    return (image.astype(np.int32) + noise).clip(0, 255).astype(np.uint8), label


def _batches(source, extra, batch_size, count, **kwargs):
  batches = data.train_batches(source,
                               batch_size,
                               extra=extra,
                               prefetch=0,
                               **{
                                   "seed": 3,
                                   **kwargs
                               })
  out = list(itertools.islice(batches, count))
  batches.close()
  return out


def _assert_same(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def _config(**fields):
  return ml_collections.ConfigDict({"name": "digits", **fields})


def _assert_one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


# --------------------------------------------------------------- batches ---


@pytest.mark.parametrize("noisy", [False, True])  # read by batch / example
@pytest.mark.parametrize("batch_size, fraction", [(8, 0.25), (10, 0.3),
                                                  (12, 0.7)])
def test_every_batch_takes_exactly_its_share_from_the_extra_set(
    batch_size, fraction, noisy):
  rows = data.extra_rows(_config(extra="x", extra_fraction=fraction),
                         batch_size)
  assert rows == int(np.floor(fraction * batch_size + 0.5))
  main, extra = _main(50), _extra(7)
  if noisy:
    main, extra = _Noisy(main), _Noisy(extra)
  batches = _batches(main, data.Extra(extra, rows), batch_size, 12)
  for images, labels in batches:
    assert images.shape == (batch_size, 2, 2, 3) and labels.dtype == np.int32
    assert (labels >= EXTRA_LABEL).sum() == rows
    # Main rows come from the main set, extra rows from the extra set.
    assert ((images[:, 0, 0, 0] >= 200) == (labels >= EXTRA_LABEL)).all()


def test_the_rows_follow_the_documented_streams():
  main, extra = _main(23), _extra(5)  # 23 // (8 - 3) = 4 steps per epoch
  batches = _batches(main, data.Extra(extra, 3), 8, 9)
  # Main: step s reads slice s % 4 of epoch s // 4's permutation, 5 wide;
  # extra: positions [3 s, 3 s + 3) of the extra permutations, end to end.
  stream = np.concatenate(
      [pipeline.extra_permutation(5, 3, epoch) for epoch in range(6)])
  for step, (_, labels) in enumerate(batches):
    epoch, index = divmod(step, 4)
    main_rows = data.epoch_permutation(23, 3, epoch)[5 * index:5 * index + 5]
    extra_rows = stream[3 * step:3 * step + 3] + EXTRA_LABEL
    # gcd(5, 3) = 1 chunk: the main rows, then the extra rows.
    np.testing.assert_array_equal(labels,
                                  np.concatenate([main_rows, extra_rows]))


@pytest.mark.parametrize("noisy", [False, True])
def test_same_seed_and_step_give_the_same_rows_and_resume_is_bitwise(noisy):
  main, extra = _main(37), _extra(11)
  if noisy:
    main, extra = _Noisy(main), _Noisy(extra)
  mix = data.Extra(extra, 4)  # 37 // 8 = 4 steps per epoch, 11 / 4 extra
  full = _batches(main, mix, 12, 14)
  _assert_same(full, _batches(main, mix, 12, 14))
  for start in (1, 4, 9):  # within, at and across epochs of both sets
    _assert_same(full[start:],
                 _batches(main, mix, 12, 14 - start, start_step=start))
  other = _batches(main, mix, 12, 3, seed=4)
  assert not np.array_equal(other[0][1], full[0][1])


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_extra_rows_that_make_the_global_batch(
    process_count, noisy):
  # 3 steps per pass over the extra set, whose examples then name the rows.
  main, extra = _main(50), _extra(12)
  if noisy:
    main, extra = _Noisy(main), _Noisy(extra)
  mix = data.Extra(extra, 4)  # 12 main + 4 extra rows, in 4 chunks of 3 + 1
  whole = _batches(main, mix, 16, 6)
  parts = [
      _batches(main, mix, 16, 6, process_index=p, process_count=process_count)
      for p in range(process_count)
  ]
  for step in range(6):
    extra_rows = [
        set(part[step][1][part[step][1] >= EXTRA_LABEL]) for part in parts
    ]
    # Each process reads its own 4 / P extra rows and no other's.
    assert all(len(rows) == 4 // process_count for rows in extra_rows)
    assert not set.intersection(*extra_rows)
    for i in range(2):  # images (with their random numbers) and labels
      np.testing.assert_array_equal(
          np.concatenate([part[step][i] for part in parts]), whole[step][i])


def test_without_extra_the_batches_are_those_of_before():
  # The formula the pipeline had before extra data, written out: step s
  # reads slice s % S of epoch s // S, example g draws from (seed, g).
  source = _Noisy(_main(30))
  batches = _batches(source, None, 8, 8)
  for step, (images, labels) in enumerate(batches):
    epoch, index = divmod(step, 3)
    rows = data.epoch_permutation(30, 3, epoch)[8 * index:8 * index + 8]
    expected = [
        source.example(int(i), pipeline.example_rng(3, 8 * step + r))[0]
        for r, i in enumerate(rows)
    ]
    np.testing.assert_array_equal(labels, rows)
    np.testing.assert_array_equal(images, np.stack(expected))
  from configs import default
  config = default.get_config()
  assert data.extra_rows(config.data, config.batch_size) == 0
  assert data.load(_config()).extra is None


def test_the_reader_survives_pickling_into_a_worker():
  main, extra = _Noisy(_main(30)), _Noisy(_extra(9))
  read = pipeline._MixedExample(  # pylint: disable=protected-access
      main, data.Extra(extra, 2), 8, 1, 2, 3, 5)
  before = [read(p) for p in range(20)]
  copy = pickle.loads(pickle.dumps(read))
  assert copy._permutation is None  # pylint: disable=protected-access
  _assert_same(before, [copy(p) for p in range(20)])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rows=0), "none to one of the sets"),
    (dict(rows=8), "none to one of the sets"),
    (dict(rows=3, process_count=2), "2 processes"),
])
def test_bad_extra_arguments_are_one_line_errors(kwargs, fragment):
  rows = kwargs.pop("rows")
  with pytest.raises(UserError) as excinfo:
    data.train_batches(_main(30),
                       8,
                       seed=0,
                       extra=data.Extra(_extra(5), rows),
                       **kwargs)
  _assert_one_line_error(excinfo, fragment)


# ------------------------------------------------------------ the config ---


@pytest.mark.parametrize("fraction, batch_size, shards, fragments", [
    (0.001, 64, 1, ("takes 0 of the 64 rows", "none from data.extra",
                    "data.extra_fraction=0.02 (1 of 64)")),
    (0.999, 64, 1, ("takes 64 of the 64", "none from the main set")),
    (0.7, 64, 8, ("takes 45 of the 64", "8 devices",
                  "data.extra_fraction=0.75 (48 of 64)")),
    (0.5, 8, 8, ("batch_size >= 16",)),
])
def test_rows_the_devices_cannot_share_name_a_fraction_that_works(
    fraction, batch_size, shards, fragments):
  config = _config(extra="x", extra_fraction=fraction)
  with pytest.raises(UserError) as excinfo:
    data.extra_rows(config, batch_size, shards)
  _assert_one_line_error(excinfo, *fragments)
  if len(fragments) == 3:  # the named fraction works
    named = float(fragments[2].split("=")[1].split()[0])
    assert data.extra_rows(_config(extra="x", extra_fraction=named), batch_size,
                           shards) > 0


def test_rows_round_half_up():
  assert extra_lib.rows(0.5, 5) == 3 and extra_lib.rows(0.3, 5) == 2
  config = _config(extra="x", extra_fraction=0.7)
  assert data.extra_rows(config, 1024) == 717  # 716.8
  with pytest.raises(UserError) as excinfo:  # 717 rows on 8 devices
    data.extra_rows(config, 1024, 8)
  _assert_one_line_error(excinfo, "data.extra_fraction=0.703 (720 of 1024)")


def _write_npz(path, images=None, labels=None, compressed=False, **more):
  rng = np.random.default_rng(0)
  arrays = dict(image=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
                if images is None else images,
                label=np.arange(12) % 10 if labels is None else labels,
                **more)
  arrays = {k: v for k, v in arrays.items() if v is not False}
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return str(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_extra_set_loads_mapped_or_in_memory(tmp_path, compressed):
  path = _write_npz(tmp_path / "gen.npz", compressed=compressed)
  splits = data.load(_config(extra=path, extra_fraction=0.3))
  assert len(splits.train) == 1437  # the main set is unchanged
  with np.load(path) as arrays:
    images, labels = arrays["image"], arrays["label"]
  got_images, got_labels = splits.extra.get_batch(np.arange(12))
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_labels.dtype == np.int32
  mapped = isinstance(splits.extra.images, extra_lib.NpzMember)
  assert mapped == (not compressed)
  if mapped:  # pickles as its location, not its data
    assert len(pickle.dumps(splits.extra.images)) < 1000
    copy = pickle.loads(pickle.dumps(splits.extra))
    np.testing.assert_array_equal(copy.example(5)[0], images[5])
  # Evaluation does not read it.
  assert data.load(_config(extra=path, extra_fraction=0.3),
                   with_extra=False).extra is None


def test_folder_extra_set_is_read_like_the_main_train_split(tmp_path):
  root = tmp_path / "generated"
  rng = np.random.default_rng(1)
  written = {}
  for name in ("3", "7"):  # digits' class names are "0" ... "9"
    (root / name).mkdir(parents=True)
    written[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(written[name]).save(root / name / "a.png")
  splits = data.load(
      _config(extra=str(root),
              extra_fraction=0.5,
              image_size=8,
              cache_dir=str(tmp_path / "cache")))
  images, labels = splits.extra.get_batch([0, 1])
  np.testing.assert_array_equal(labels, [3, 7])
  np.testing.assert_array_equal(images, np.stack([written["3"], written["7"]]))
  # The main set's decode and resize: squash to 16 px.
  splits = data.load(
      _config(extra=str(root),
              extra_fraction=0.5,
              cache_dir=str(tmp_path / "cache")))
  assert splits.extra.get_batch([0])[0].shape == (1, 16, 16, 3)


def _bad_inputs(tmp_path):
  """(data fields, fragments of the one-line error) for bad extra sets."""
  npz = lambda name, **kw: _write_npz(tmp_path / name, **kw)
  (tmp_path / "empty_folder").mkdir()
  (tmp_path / "odd_folder" / "cat").mkdir(parents=True)
  (tmp_path / "not.npz").write_text("hello")
  return [
      (dict(extra=str(tmp_path / "missing.npz"),
            extra_fraction=0.5), ("missing.npz does not exist",)),
      (dict(extra=str(tmp_path / "not.npz"),
            extra_fraction=0.5), ("is not an .npz",)),
      (dict(extra=npz("keys.npz", images=False, x=np.zeros(3)),
            extra_fraction=0.5), ("has arrays ['label', 'x']", "'image'")),
      (dict(extra=npz("dtype.npz", images=np.zeros((12, 16, 16, 3))),
            extra_fraction=0.5), ("'image' is float64", "uint8")),
      (dict(extra=npz("gray.npz", images=np.zeros((12, 16, 16), np.uint8)),
            extra_fraction=0.5), ("[12, 16, 16]", "[N, H, W, 3]")),
      (dict(extra=npz("labels.npz", labels=np.zeros(5, np.int64)),
            extra_fraction=0.5), ("'label' is int64 [5]", "[12]")),
      (dict(extra=npz("float_labels.npz", labels=np.zeros(12)),
            extra_fraction=0.5), ("'label' is float64",)),
      (dict(extra=npz("pickled.npz",
                      labels=np.array([object()] * 12, dtype=object)),
            extra_fraction=0.5), ("'label' is object",)),
      (dict(extra=npz("size.npz"), extra_fraction=0.5,
            image_size=32), ("images are 16x16", "32x32", "resize")),
      (dict(extra=npz("range.npz", labels=np.arange(12)),
            extra_fraction=0.5), ("label 11", "10 classes")),
      (dict(extra=npz("negative.npz", labels=-np.ones(12, np.int64)),
            extra_fraction=0.5), ("label -1",)),
      (dict(extra=npz("f0.npz"), extra_fraction=0.0), ("must be in (0, 1)",)),
      (dict(extra=npz("f1.npz"), extra_fraction=1.0), ("must be in (0, 1)",)),
      (dict(extra=npz("fnan.npz"),
            extra_fraction=float("nan")), ("must be in (0, 1)",)),
      (dict(extra_fraction=0.5), ("without data.extra",)),
      (dict(extra=str(tmp_path / "empty_folder"),
            extra_fraction=0.5), ("no class subfolders",)),
      (dict(extra=str(tmp_path / "odd_folder"), extra_fraction=0.5),
       ("class folders the main set does not have: cat",)),
  ]


def test_bad_extra_sets_are_one_line_errors(tmp_path):
  for fields, fragments in _bad_inputs(tmp_path):
    with pytest.raises(UserError) as excinfo:
      data.load(_config(**{"image_size": 16, **fields}))
    _assert_one_line_error(excinfo, *fragments)


def test_a_run_takes_its_rows_and_its_epoch_length_from_the_config(
    tmp_path, monkeypatch):
  from tests import _tiny  # pylint: disable=g-import-not-at-top
  from vitat_jax import setup  # pylint: disable=g-import-not-at-top
  from vitat_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = _write_npz(tmp_path / "gen.npz",
                    images=np.zeros((12, 8, 8, 3), np.uint8))
  config = _tiny.config(**{"data.extra": path, "data.extra_fraction": 0.25})
  run = setup.prepare(config, str(tmp_path / "run"), "train")
  # 8 of each batch of 32 from the extra set; an epoch is the main set's
  # 320 examples 24 at a time.
  assert run.extra.rows == 8 and run.extra.source is run.splits.extra
  assert run.steps_per_epoch == 320 // 24
  assert setup.prepare(_tiny.config(), str(tmp_path / "plain"),
                       "train").extra is None
  # Evaluation neither needs nor reads the extra set (nor the train split:
  # its steps per epoch are those its checkpoint records, none here).
  pathlib.Path(path).unlink()
  monkeypatch.setattr(workdir_lib, "has_checkpoints", lambda w: True)
  run = setup.prepare(config, str(tmp_path / "run"), "eval")
  assert run.extra is None and run.splits.extra is None
  assert run.splits.train is None and run.steps_per_epoch == 1


def test_a_worker_process_reads_the_same_mixed_batches(tmp_path):
  # The extra images mapped in place from an .npz: a worker maps the file
  # itself (the source pickles as its location).
  path = pathlib.Path(
      _write_npz(tmp_path / "gen.npz",
                 images=np.full((12, 2, 2, 3), 255, np.uint8)))
  images, labels = extra_lib.read_npz(path)
  assert isinstance(images, extra_lib.NpzMember)
  mix = data.Extra(_Noisy(data.ArraySource(images, labels + EXTRA_LABEL)), 2)
  main = _Noisy(_main(30))
  inline = _batches(main, mix, 8, 6, workers=0)
  _assert_same(_batches(main, mix, 8, 6, workers=1), inline)

"""Tests for gfa_jax.data: readers on tiny synthetic copies, errors, batch order, augmentation."""

import pickle
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import data

RECORDS_PER_FILE = 3
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def _no_data_anywhere(monkeypatch, tmp_path_factory):
  """No data folder of this machine is searched: no env variables, an empty HOME."""
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(data.TFDS_DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def fake_cifar(seed=0):
  """{file name: (uint8 images [3, 32, 32, 3], labels [3])} for the six batch files."""
  rng = np.random.default_rng(seed)
  return {name: (rng.integers(0, 256, (RECORDS_PER_FILE, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, RECORDS_PER_FILE))
          for name in TRAIN_FILES + ["test_batch"]}


def planes(images):
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R, G, B planes per row.


def write_bin(root, files):
  folder = root / "cifar-10-batches-bin"
  folder.mkdir(parents=True)
  for name, (images, labels) in files.items():
    records = np.concatenate([labels[:, None].astype(np.uint8), planes(images)], axis=1)
    records.tofile(folder / f"{name}.bin")
  return folder


def write_py(root, files):
  folder = root / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for name, (images, labels) in files.items():
    batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
             b"data": planes(images), b"filenames": [b"x.png"] * len(labels)}
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f, protocol=2)  # The official files are Python 2 pickles.
  return folder


def assert_matches(dataset, files):
  train = [files[name] for name in TRAIN_FILES]
  np.testing.assert_array_equal(dataset.train_images, np.concatenate([t[0] for t in train]))
  np.testing.assert_array_equal(dataset.train_labels, np.concatenate([t[1] for t in train]))
  np.testing.assert_array_equal(dataset.test_images, files["test_batch"][0])
  np.testing.assert_array_equal(dataset.test_labels, files["test_batch"][1])
  assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32


def dataset_arrays(dataset):
  return (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)


@pytest.mark.parametrize("source, write", [("cifar10_bin", write_bin), ("cifar10_py", write_py)])
def test_reads_official_layouts(tmp_path, source, write):
  files = fake_cifar()
  folder = write(tmp_path, files)
  for data_dir in (tmp_path, folder):  # The parent folder or the release folder itself.
    for name in (source, "cifar10", "auto"):
      dataset = data.load_dataset(name, str(data_dir))
      assert_matches(dataset, files)
      assert folder.name in dataset.description and str(folder.parent) not in dataset.description


def test_searches_binary_first_and_reads_env(tmp_path, monkeypatch):
  binary, python = fake_cifar(seed=1), fake_cifar(seed=2)
  write_bin(tmp_path, binary)
  write_py(tmp_path, python)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert_matches(data.load_dataset(), binary)
  assert_matches(data.load_dataset("cifar10_py"), python)


@pytest.mark.parametrize("source", ["cifar10", "cifar10_bin", "cifar10_py", "tfds"])
def test_missing_data_says_where_it_looked(tmp_path, source):
  (tmp_path / "cifar10").mkdir()  # An empty TFDS folder (failed download) is not a copy.
  with pytest.raises(data.DataNotFoundError) as error:
    data.load_dataset(source, str(tmp_path))
  assert isinstance(error.value, FileNotFoundError)
  message = str(error.value)
  wanted = {"cifar10_bin": "cifar-10-batches-bin", "cifar10_py": "cifar-10-batches-py",
            "tfds": "cifar10  ("}
  for name, folder in wanted.items():
    assert (f"{tmp_path}/{folder}" in message) == (source in (name, "cifar10"))
  for hint in ("--config.download=True", "prepare_cifar10.py", "tfds build cifar10",
               "--config.data_dir", data.DATA_DIR_ENV, "--config.data_source=embedded"):
    assert hint in message


def test_no_data_dir_given_searches_the_default_places(tmp_path, monkeypatch):
  """Without data_dir: $GFA_DATA_DIR, then TFDS's $TFDS_DATA_DIR and ~/tensorflow_datasets."""
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "gfa"))
  monkeypatch.setenv(data.TFDS_DATA_DIR_ENV, str(tmp_path / "tfds"))
  home_tfds = data.search_dirs(None)[-1]
  assert data.search_dirs(None) == [tmp_path / "gfa", tmp_path / "tfds", home_tfds]
  assert home_tfds.name == "tensorflow_datasets" and home_tfds.parent == Path.home()
  with pytest.raises(data.DataNotFoundError) as error:
    data.load_dataset("cifar10")
  message = str(error.value)
  looked = [message.index(f"{folder}/cifar-10-batches-bin") for folder in data.search_dirs(None)]
  assert looked == sorted(looked)
  assert data.search_dirs(str(tmp_path / "mine")) == [tmp_path / "mine"]  # Only the one named.


def test_unknown_source():
  with pytest.raises(ValueError, match="unknown data source 'cifar100'"):
    data.load_dataset("cifar100")


def test_truncated_binary_file(tmp_path):
  folder = write_bin(tmp_path, fake_cifar())
  path = folder / "data_batch_2.bin"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ValueError, match=r"data_batch_2\.bin: 9218 bytes .*truncated"):
    data.load_dataset("cifar10", str(tmp_path))


def test_missing_binary_file(tmp_path):
  folder = write_bin(tmp_path, fake_cifar())
  (folder / "test_batch.bin").unlink()
  with pytest.raises(ValueError, match=r"test_batch\.bin is missing.*incomplete"):
    data.load_dataset("cifar10_bin", str(tmp_path))


def test_bad_label_byte(tmp_path):
  folder = write_bin(tmp_path, fake_cifar())
  raw = bytearray((folder / "data_batch_1.bin").read_bytes())
  raw[0] = 10  # The first record's label byte.
  (folder / "data_batch_1.bin").write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"data_batch_1\.bin: labels outside \[0, 10\)"):
    data.load_dataset("cifar10_bin", str(tmp_path))


@pytest.mark.parametrize("corrupt, problem", [
    (lambda raw: raw[:len(raw) // 2], "not a CIFAR-10 python batch"),
    (lambda raw: pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]},
                              protocol=2),
     r"'data' is uint8 \(3, 100\), expected uint8 \[N, 3072\]"),
])
def test_corrupt_pickle(tmp_path, corrupt, problem):
  folder = write_py(tmp_path, fake_cifar())
  path = folder / "data_batch_4"
  path.write_bytes(corrupt(path.read_bytes()))
  with pytest.raises(ValueError, match=rf"data_batch_4: {problem}"):
    data.load_dataset("cifar10_py", str(tmp_path))


class _Poisoned:
  """A pickle payload: loading it calls open(path, "w"), creating the file (code execution)."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_poisoned_pickle_is_refused_before_it_runs(tmp_path):
  folder = write_py(tmp_path, fake_cifar())
  live = tmp_path / "made_by_plain_pickle"
  pickle.loads(pickle.dumps(_Poisoned(live), protocol=2)).close()
  assert live.exists()  # The payload works: plain pickle runs it.
  marker = tmp_path / "made_by_the_reader"
  batch = {b"data": _Poisoned(marker), b"labels": [0, 1, 2]}
  (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
  with pytest.raises(ValueError, match=r"^refusing to unpickle \S*\.open from \S*data_batch_3: "):
    data.load_dataset("cifar10_py", str(tmp_path))
  assert not marker.exists()


def test_genuine_python_batch_still_reads(tmp_path):
  """A batch as the release has it: protocol 2, bytes keys, uint8 rows, a list of labels."""
  images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  path = tmp_path / "data_batch_1"
  path.write_bytes(pickle.dumps({b"batch_label": b"training batch 1 of 5", b"labels": [7, 1],
                                 b"data": planes(images), b"filenames": [b"a.png", b"b.png"]},
                                protocol=2))
  read, labels = data.readers._read_pickle_file(path)
  np.testing.assert_array_equal(read, images)
  np.testing.assert_array_equal(labels, [7, 1])


def test_num_train_larger_than_the_data_is_refused(tmp_path, tiny_config):
  from gfa_jax import train_lib
  tiny_config.num_train = 100_000
  with pytest.raises(ValueError, match=r"config\.num_train=100000 but .* has only 2000 train "
                     r"images; use --config\.num_train=2000 or less"):
    train_lib.train_and_evaluate(tiny_config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  tiny_config.num_train, tiny_config.num_eval_examples = 0, 501
  with pytest.raises(ValueError, match=r"num_eval_examples=501 .* only 500 test images"):
    train_lib.load_splits(tiny_config)


def test_auto_falls_back_to_the_subset_only_with_a_warning(caplog):
  with caplog.at_level("WARNING"):
    dataset = data.load_dataset("auto")
  assert "embedded" in dataset.description and "embedded 2,000-image subset" in caplog.text
  with pytest.raises(data.DataNotFoundError):
    data.load_dataset()  # The default source is full CIFAR-10: no fall-back.


def test_embedded_subset():
  dataset = data.load_dataset("embedded")
  chex.assert_shape(dataset.train_images, (2000, 32, 32, 3))
  chex.assert_shape(dataset.test_images, (500, 32, 32, 3))
  assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.int32
  assert "embedded" in dataset.description and "JPEG-75" in dataset.description
  # The first 2,000 / 500 CIFAR-10 images hold every class at roughly a tenth.
  assert np.all(np.abs(np.bincount(dataset.train_labels, minlength=10) - 200) < 40)
  assert np.all(np.abs(np.bincount(dataset.test_labels, minlength=10) - 50) < 20)
  # Decoded photos, not blank or noise: mid-grey on average, with structure.
  assert 80 < dataset.train_images.mean() < 160 and dataset.train_images.std() > 40
  with np.load(data.EMBEDDED_PATH) as f:
    assert "make_embedded_subset.py" in str(f["provenance"])


def test_dataset_validates_labels():
  images = np.zeros((2, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 10\)"):
    data.ImageDataset(images, np.array([0, 10], np.int32), images, np.zeros(2, np.int32), "x")


def test_train_batch_indices():
  num_examples, batch_size, seed = 10, 3, 7
  steps = data.steps_per_epoch(num_examples, batch_size)
  assert steps == 3

  def epoch(seed, e):
    return np.concatenate([data.train_batch_indices(num_examples, batch_size, seed, step)
                           for step in range(e * steps, (e + 1) * steps)])

  first = epoch(seed, 0)
  assert first.dtype == np.int64 and first.shape == (9,)
  assert len(set(first.tolist())) == 9  # Each example at most once an epoch (one dropped).
  np.testing.assert_array_equal(first, epoch(seed, 0))  # Pure function of (seed, step).
  assert not np.array_equal(first, epoch(seed, 1))  # A fresh order each epoch...
  assert not np.array_equal(first, epoch(seed + 1, 0))  # ...and for each seed.
  # With no remainder, an epoch is exactly a permutation of all examples.
  full = np.concatenate([data.train_batch_indices(12, 3, seed, s) for s in range(4, 8)])
  np.testing.assert_array_equal(np.sort(full), np.arange(12))


def test_steps_per_epoch_rejects_big_batch():
  with pytest.raises(ValueError, match="batch_size must be in"):
    data.steps_per_epoch(10, 11)


def test_augment_identity_when_disabled():
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  out = data.augment(jax.random.key(1), images, crop_padding=0, flip=False)
  chex.assert_trees_all_equal(out, images)


def test_augment_crop_is_a_shift_of_the_padded_image():
  pad, batch = 2, 16
  images = jax.random.uniform(jax.random.key(0), (batch, 6, 6, 3), minval=0.1)
  crop = jax.jit(data.augment, static_argnames=("crop_padding", "flip"))
  out = np.asarray(crop(jax.random.key(1), images, crop_padding=pad, flip=False))
  chex.assert_shape(out, images.shape)
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  corners = []
  for i in range(batch):
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 6])]
    assert len(matches) == 1, f"image {i} is not a crop of its padded image"
    corners += matches
  assert len(set(corners)) > 1  # Each image draws its own crop.


def test_augment_flip():
  images = jax.random.uniform(jax.random.key(0), (16, 5, 5, 3))
  out = data.augment(jax.random.key(2), images, crop_padding=0, flip=True)
  flipped = [bool(jnp.array_equal(o, x[:, ::-1])) for o, x in zip(out, images)]
  kept = [bool(jnp.array_equal(o, x)) for o, x in zip(out, images)]
  assert all(f != k for f, k in zip(flipped, kept))  # Each image flipped or kept as is.
  assert any(flipped) and any(kept)


def test_to_float():
  images = np.array([[0, 128, 255]], np.uint8)
  chex.assert_trees_all_close(data.to_float(images), np.array([[0, 128 / 255, 1]], np.float32))
  assert data.to_float(jnp.asarray(images)).dtype == jnp.float32
  with pytest.raises(ValueError, match="expects uint8"):
    data.to_float(images.astype(np.float32))


# --- Fashion-MNIST IDX files (the paper's MLP setting) --------------------------------------


def write_idx(path, array, compress):
  """An IDX file of unsigned bytes, as LeCun's format defines it."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    import gzip
    path = path.with_name(path.name + ".gz")
    payload = gzip.compress(payload)
  path.write_bytes(payload)
  return path


def write_fashion(folder, n_train=12, n_test=5, compress=True, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    image_name, label_name = data.FASHION_FILES[split]
    write_idx(folder / image_name, images, compress)
    write_idx(folder / label_name, labels, compress)
    arrays[split] = (images, labels)
  return arrays


@pytest.mark.parametrize("compress, sub", [(True, "."), (False, "fashion-mnist"),
                                           (True, "FashionMNIST/raw")])
def test_reads_fashion_mnist_idx_files(tmp_path, compress, sub):
  arrays = write_fashion(tmp_path / sub, compress=compress)
  dataset = data.load_dataset("fashion_mnist", str(tmp_path))
  chex.assert_shape(dataset.train_images, (12, 28, 28, 1))
  chex.assert_shape(dataset.test_images, (5, 28, 28, 1))
  np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(dataset.test_labels, arrays["test"][1])
  assert dataset.test_labels.dtype == np.int32 and "Fashion-MNIST" in dataset.description
  assert data.image_shape("fashion_mnist") == (28, 28, 1)


def test_truncated_or_foreign_idx_files_are_named(tmp_path):
  write_fashion(tmp_path, compress=False)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte: .* truncated"):
    data.load_dataset("fashion_mnist", str(tmp_path))
  path.write_bytes(b"not an idx file at all")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.load_dataset("fashion_mnist", str(tmp_path))
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  write_fashion(tmp_path / "other", compress=True)
  (tmp_path / "other" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(ValueError, match="incomplete Fashion-MNIST"):
    data.load_dataset("fashion_mnist", str(tmp_path / "other"))
  with pytest.raises(data.DataNotFoundError, match="Fashion-MNIST not found"):
    data.load_dataset("fashion_mnist", str(tmp_path / "nowhere"))


def test_the_mlp_trains_on_fashion_mnist_and_reloads(tmp_path, tiny_config):
  """The paper's setting end to end on small IDX files: GFA-DEEP on the MLP, 28x28x1 inputs."""
  from gfa_jax import checkpoints, train_lib
  write_fashion(tmp_path / "fm", n_train=64, n_test=20)
  from configs import fashion_mnist_mlp
  config = fashion_mnist_mlp.get_config()
  config.model.hidden = tiny_config.model.hidden
  config.update({"data_dir": str(tmp_path / "fm"), "num_train": 64, "batch_size": 16,
                 "num_epochs": 1, "num_eval_examples": 20, "num_train_eval_examples": 20,
                 "log_every_steps": 2, "eval_every_steps": 0, "checkpoint_every_steps": 4})
  tiny_config = config
  final = train_lib.train_and_evaluate(tiny_config, tmp_path / "run")
  assert np.isfinite(final["test/accuracy"]) and "train/alignment/layer0" in final
  apply_fn, variables = checkpoints.load_model(tmp_path / "run")
  logits = apply_fn(variables, jnp.zeros((2, 28, 28, 1)))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)

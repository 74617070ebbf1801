"""TFDS copies of CIFAR-10 without TensorFlow: the download path (TFDS's download_and_prepare on
a small cifar-10-binary.tar.gz made here, offline), TFRecord and array_record copies found in
TFDS's default places, read image for image, and no fall-back to the subset."""

import json
import shutil
import struct
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from gfa_jax import data, train_lib
from gfa_jax.data import tfds_copy

PER_FILE = 3  # Records in each of the six batch files: 15 train, 3 test images.


def make_release_tar(folder, truncate=False):
  """cifar-10-binary.tar.gz as the official one lays it out; returns (tar, arrays)."""
  rng = np.random.default_rng(0)
  release = folder / "cifar-10-batches-bin"
  release.mkdir(parents=True)
  arrays = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    images = rng.integers(0, 256, (PER_FILE, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, PER_FILE).astype(np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(PER_FILE, -1)  # R, G, B planes.
    raw = np.concatenate([labels[:, None], rows], axis=1).tobytes()
    (release / f"{name}.bin").write_bytes(raw[:-100] if truncate else raw)
    arrays[name] = (images, labels)
  (release / "batches.meta.txt").write_text("\n".join(data.CLASS_NAMES) + "\n")
  tar = folder / "cifar-10-binary.tar.gz"
  with tarfile.open(tar, "w:gz") as f:
    f.add(release, arcname="cifar-10-batches-bin")
  shutil.rmtree(release)
  train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
  return tar, {"train": (np.concatenate([t[0] for t in train]),
                         np.concatenate([t[1] for t in train])),
               "test": arrays["test_batch"]}


def offline_download(tar, extract_to):
  """DownloadManager.download_and_extract for TFDS's CIFAR-10 URL, served from `tar`."""
  def download_and_extract(self, url):
    assert url.endswith("cifar-10-binary.tar.gz")
    with tarfile.open(tar) as f:
      f.extractall(extract_to, filter="data")
    return str(extract_to)
  return download_and_extract


def clean_env(monkeypatch, home):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(data.TFDS_DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("HOME", str(home))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """CIFAR-10 'downloaded' with --config.download's path into an empty HOME's
  ~/tensorflow_datasets: (HOME, the dataset that load returned, the source arrays)."""
  root = tmp_path_factory.mktemp("prepared")
  tar, arrays = make_release_tar(root / "server")
  with pytest.MonkeyPatch.context() as monkeypatch:
    clean_env(monkeypatch, root / "home")
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        offline_download(tar, root / "extracted"))
    monkeypatch.setattr(tfds_copy, "check_reachable", lambda host: None)
    dataset = data.load_dataset("cifar10", download=True)
  return root / "home", dataset, arrays


def test_download_prepares_an_array_record_copy_read_image_for_image(prepared, monkeypatch,
                                                                     capsys):
  home, dataset, arrays = prepared
  folder = home / "tensorflow_datasets" / "cifar10"
  version = tfds_copy.version_dir(folder)
  assert version is not None and not list(folder.glob("incomplete*"))
  assert json.loads((version / "dataset_info.json").read_text())["fileFormat"] == "array_record"
  assert (version / "features.json").is_file()
  assert "array_record" in dataset.description
  for split in ("train", "test"):
    images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
    # The order tfds itself gives for this copy (shard, then record order)...
    reference = tfds.data_source("cifar10", split=split, data_dir=str(folder.parent))
    assert len(reference) == len(images) == len(arrays[split][0])
    for i in range(len(reference)):
      example = reference[i]
      np.testing.assert_array_equal(images[i], example["image"])
      assert labels[i] == example["label"]
      # ...and each image equal to the release's image its id names ("train_00012").
      index = int(example["id"].decode().split("_")[1])
      np.testing.assert_array_equal(images[i], arrays[split][0][index])
      assert labels[i] == arrays[split][1][index]
  clean_env(monkeypatch, home)  # A later run finds it in the default place, no flag needed.
  again = data.load_dataset("cifar10")
  np.testing.assert_array_equal(again.train_images, dataset.train_images)
  assert f"Reading CIFAR-10 from {folder}\n" in capsys.readouterr().err  # Which copy, said.


def write_tfrecord(path, records):
  """TFRecord framing: length u64, masked CRC32C of it, data, masked CRC32C of the data."""
  with open(path, "wb") as f:
    for record in records:
      head = struct.pack("<Q", len(record))
      crcs = tfds_copy.masked_crc32c([head, record])
      f.write(head + struct.pack("<I", crcs[0]) + record + struct.pack("<I", crcs[1]))


def tfrecord_copy(prepared, root, train_shards=2):
  """The prepared copy rewritten as TFDS writes TFRecord copies (TFDS needs TensorFlow to
  write TFRecord, absent here): same dataset_info.json with fileFormat tfrecord and the shard
  lengths, files cifar10-<split>.tfrecord-0000i-of-0000n."""
  source = tfds_copy.version_dir(prepared[0] / "tensorflow_datasets" / "cifar10")
  target = root / "cifar10" / source.name
  target.mkdir(parents=True)
  shutil.copy(source / "features.json", target)
  info = json.loads((source / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  for entry in info["splits"]:
    reader = array_record_module.ArrayRecordReader(
        str(source / f"cifar10-{entry['name']}.array_record-00000-of-00001"))
    records = list(reader.read_all())
    shards = np.array_split(np.arange(len(records)), train_shards if entry["name"] == "train"
                            else 1)
    entry["shardLengths"] = [str(len(s)) for s in shards]
    for i, shard in enumerate(shards):
      write_tfrecord(target / f"cifar10-{entry['name']}.tfrecord-{i:05d}-of-{len(shards):05d}",
                     [records[j] for j in shard])
  (target / "dataset_info.json").write_text(json.dumps(info))
  return target


def test_tfrecord_copy_in_tfds_data_dir_and_the_search_order(prepared, tmp_path, monkeypatch):
  clean_env(monkeypatch, tmp_path / "empty_home")
  version = tfrecord_copy(prepared, tmp_path / "tfds")
  monkeypatch.setenv(data.TFDS_DATA_DIR_ENV, str(tmp_path / "tfds"))
  dataset = data.load_dataset("cifar10")
  assert "tfrecord" in dataset.description
  assert len(list(version.glob("cifar10-train.tfrecord-*-of-00002"))) == 2
  for got, want in zip(data_arrays(dataset), data_arrays(prepared[1])):
    np.testing.assert_array_equal(got, want)  # Shard 0 then shard 1: the array_record order.
  assert data.load_dataset("tfds", str(tmp_path / "tfds")).description == dataset.description
  # $TFDS_DATA_DIR comes before ~/tensorflow_datasets, $GFA_DATA_DIR before both.
  monkeypatch.setenv("HOME", str(prepared[0]))
  assert "tfrecord" in data.load_dataset("cifar10").description
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "gfa"))
  (tmp_path / "gfa").mkdir()
  with tarfile.open(make_release_tar(tmp_path / "server")[0]) as f:
    f.extractall(tmp_path / "gfa", filter="data")
  assert "official binary" in data.load_dataset("cifar10").description


def data_arrays(dataset):
  return (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)


@pytest.mark.parametrize("damage, problem", [
    (lambda raw: raw[:-3], "truncated"),
    (lambda raw: raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "record 0 fails its CRC32C"),
])
def test_damaged_tfrecord_is_refused(prepared, tmp_path, damage, problem):
  version = tfrecord_copy(prepared, tmp_path)
  path = version / "cifar10-train.tfrecord-00001-of-00002"
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(ValueError, match=rf"tfrecord-00001-of-00002: .*{problem}"):
    data.load_dataset("tfds", str(tmp_path))
  path.unlink()
  with pytest.raises(ValueError, match=r"tfrecord-00001-of-00002 is missing: .* incomplete"):
    data.load_dataset("tfds", str(tmp_path))


def test_masked_crc32c_known_value():
  mask = lambda crc: (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  # CRC32C of b"123456789" is 0xE3069283 (RFC 3720's check value); of b"" it is 0.
  assert tfds_copy.masked_crc32c([b"123456789", b""]).tolist() == [mask(0xE3069283), mask(0)]


@pytest.mark.parametrize("failure", ["unreachable", "offline", "midway"])
def test_failed_download_says_so_and_leaves_no_copy(tmp_path, monkeypatch, failure):
  clean_env(monkeypatch, tmp_path / "home")
  for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(proxy, raising=False)

  def no_network(address, timeout):
    raise OSError("[Errno -2] Name or service not known")
  monkeypatch.setattr(tfds_copy.socket, "create_connection", no_network)
  if failure == "unreachable":  # Found at once, not after TFDS's 3.5 minutes of retries.
    with pytest.raises(data.DownloadError, match=r"^cannot download CIFAR-10: www\.cs\.toronto"
                       r"\.edu is unreachable \(\[Errno -2\] Name or service not known\); "):
      data.load_dataset("cifar10", download=True)
    assert not (tmp_path / "home" / "tensorflow_datasets").exists()
    assert tfds_copy.URL == tfds.builder("cifar10")._cifar_info.url  # The URL TFDS fetches.
    return
  monkeypatch.setattr(tfds_copy, "check_reachable", lambda host: None)
  if failure == "offline":
    def download_and_extract(self, url):
      raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")
  else:  # The archive arrives but a batch file is cut short: preparing fails half-way.
    download_and_extract = offline_download(make_release_tar(tmp_path / "server", truncate=True)[0],
                                            tmp_path / "extracted")
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      download_and_extract)
  with pytest.raises(data.DownloadError) as error:
    data.load_dataset("cifar10", download=True)
  message = str(error.value)
  assert "\n" not in message and "downloading CIFAR-10 with TFDS into" in message
  assert ("Failed to resolve" in message) == (failure == "offline")
  folder = tmp_path / "home" / "tensorflow_datasets" / "cifar10"
  assert not list(folder.glob("*")), list(folder.glob("*"))  # No half-prepared version.
  # What a killed preparation leaves (TFDS's work folder) is not a copy either.
  (folder / "incomplete.ABC123_3.0.2").mkdir()
  (folder / "incomplete.ABC123_3.0.2" / "dataset_info.json").write_text("{}")
  with pytest.raises(data.DataNotFoundError):
    data.load_dataset("cifar10")


def test_configs_that_say_full_cifar10_refuse_the_subset(tmp_path, monkeypatch):
  import importlib
  from pathlib import Path

  clean_env(monkeypatch, tmp_path)
  names = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("cifar_*.py"))
  assert "cifar_deep" in names
  for name in names:
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.data_source == "cifar10" and not config.download, name
  with pytest.raises(data.DataNotFoundError) as error:
    train_lib.load_splits(config)
  message = str(error.value)
  assert message.startswith("CIFAR-10 not found.") and "--config.download=True" in message
  assert f"{tmp_path}/tensorflow_datasets/cifar10  (TFDS copy" in message

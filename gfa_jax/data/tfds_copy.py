"""Prepared TFDS copies of CIFAR-10, read without TensorFlow, and TFDS's download with consent.

A copy is `<root>/cifar10/<version>/` with `dataset_info.json`, `features.json` and, per split,
shards `cifar10-<split>.<format>-<i>-of-<n>` in TFDS's two file formats: `tfrecord` (TFDS's
default; framed records, read here) and `array_record` (read with the `array_record` package
TFDS installs). Every record is a serialized `tf.train.Example` (parsed with the proto classes
TFDS ships) holding a PNG `image`, an int64 `label` and an `id`.

Order: shard 0..n-1, each in record order, which is what `tfds.data_source` and
`tfds.load(..., shuffle_files=False)` give for the same copy. TFDS shuffled the examples when it
prepared the copy (by a hash of each example's key), so this is not the official release's
order; the `id` feature ("train_01234") names each image's index in that release.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import logging
import os
import re
import socket
import struct
import sys
import urllib.parse
from pathlib import Path

import numpy as np

from gfa_jax.data import readers

NAME = "cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"  # What TFDS's builder fetches.
FORMATS = ("tfrecord", "array_record")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")  # Not TFDS's `incomplete.XXXX_3.0.2` work folders.


# CRC32C (Castagnoli), the checksum of TFRecord framing --------------------------------------
def _crc_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
  return table.astype(np.uint32)


_CRC_TABLE = _crc_table()


def masked_crc32c(blobs: list[bytes], chunk: int = 4096) -> np.ndarray:
  """TFRecord's masked CRC32C of each byte string (uint32 [len(blobs)]).

  Vectorised over the blobs (byte j of every blob at once, shorter ones left as they are), so
  60,000 records of ~2.5 KB take about a second instead of a minute of Python loops.
  """
  out = np.empty(len(blobs), np.uint32)
  for start in range(0, len(blobs), chunk):
    part = blobs[start:start + chunk]
    lengths = np.array([len(b) for b in part])
    width = int(lengths.max(initial=0))
    padded = np.zeros((len(part), width), np.uint8)
    for i, blob in enumerate(part):
      padded[i, :len(blob)] = np.frombuffer(blob, np.uint8)
    crc = np.full(len(part), 0xFFFFFFFF, np.uint32)
    for j in range(width):
      step = _CRC_TABLE[(crc ^ padded[:, j]) & 0xFF] ^ (crc >> 8)
      crc = np.where(j < lengths, step, crc)
    crc ^= np.uint32(0xFFFFFFFF)
    out[start:start + chunk] = ((crc >> 15) | (crc << 17)) + np.uint32(0xA282EAD8)
  return out


def read_tfrecord(path: Path) -> list[bytes]:
  """The records of one TFRecord file: each framed as length (u64), masked CRC32C of the
  length (u32), data, masked CRC32C of the data (u32), little-endian. Both checksums are
  verified; a truncated or damaged file raises ValueError naming it."""
  raw = path.read_bytes()
  records, heads, crcs, pos = [], [], [], 0
  while pos < len(raw):
    if pos + 12 > len(raw):
      raise ValueError(f"{path}: truncated TFRecord header at byte {pos}; the file is "
                       "incomplete, download or prepare the copy again")
    length, length_crc = struct.unpack_from("<QI", raw, pos)
    end = pos + 12 + length + 4
    if end > len(raw):
      raise ValueError(f"{path}: a record at byte {pos} runs past the end of the file "
                       f"({length} bytes); the file is truncated, download or prepare it again")
    heads.append((raw[pos:pos + 8], length_crc))
    records.append(raw[pos + 12:pos + 12 + length])
    crcs.append(struct.unpack_from("<I", raw, end - 4)[0])
    pos = end
  got_heads = masked_crc32c([h for h, _ in heads])
  got_data = masked_crc32c(records)
  bad = np.flatnonzero((got_heads != [c for _, c in heads]) | (got_data != np.array(crcs)))
  if len(bad):
    raise ValueError(f"{path}: record {bad[0]} fails its CRC32C ({len(bad)} records do); the "
                     "file is corrupt, download or prepare the copy again")
  return records


def _read_array_record(path: Path) -> list[bytes]:
  from array_record.python import array_record_module  # Installed with tensorflow_datasets.

  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      return list(reader.read_all())
    finally:
      reader.close()
  except (RuntimeError, ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable array_record file ({e}); the file is corrupt, "
                     "download or prepare the copy again") from e


def _parse_examples(path: Path, records: list[bytes]) -> tuple[list[bytes], list[int]]:
  """(PNG bytes, labels) of serialized tf.train.Example records."""
  from google.protobuf.message import DecodeError
  from tensorflow_datasets.proto import tf_example_pb2  # Pure protobuf, no TensorFlow.

  pngs, labels = [], []
  for i, record in enumerate(records):
    try:
      feature = tf_example_pb2.Example.FromString(record).features.feature
      pngs.append(feature["image"].bytes_list.value[0])
      labels.append(feature["label"].int64_list.value[0])
    except (DecodeError, IndexError) as e:
      raise ValueError(f"{path}: record {i} is not a CIFAR-10 tf.train.Example with 'image' "
                       f"and 'label' ({type(e).__name__}); the copy is corrupt or another "
                       "data set, prepare it again") from e
  return pngs, labels


def version_dir(folder: Path) -> Path | None:
  """The newest prepared version `folder/<x.y.z>/` (with dataset_info.json), or None."""
  versions = [d for d in folder.glob("*/dataset_info.json") if _VERSION.match(d.parent.name)]
  if not versions:
    return None
  return max(versions, key=lambda d: tuple(int(v) for v in d.parent.name.split("."))).parent


def _shard_paths(directory: Path, info: dict, split: str) -> list[tuple[Path, int]]:
  """[(shard file, its number of records)] of `split`, in shard order, from dataset_info."""
  entry = next((s for s in info.get("splits", []) if s.get("name") == split), None)
  if entry is None or not entry.get("shardLengths"):
    raise ValueError(f"{directory}/dataset_info.json lists no shards of split {split!r}; an "
                     "incomplete TFDS copy, prepare it again")
  lengths = [int(n) for n in entry["shardLengths"]]
  template = entry.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  fmt = info.get("fileFormat", "tfrecord")  # Copies written before the field: TFRecord.
  return [(directory / template.replace("{DATASET}", NAME).replace("{SPLIT}", split)
           .replace("{FILEFORMAT}", fmt)
           .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"), n)
          for i, n in enumerate(lengths)]


def read_tfds_copy(folder: Path) -> readers.ImageDataset:
  """A prepared TFDS copy; `folder` is `<tfds data dir>/cifar10`. Returns uint8 images in
  the copy's order (module docstring); ValueError for a corrupt or incomplete copy."""
  directory = version_dir(folder)
  if directory is None:
    raise ValueError(f"{folder} holds no prepared version (<x.y.z>/dataset_info.json); "
                     "prepare it again")
  info = json.loads((directory / "dataset_info.json").read_text())
  fmt = info.get("fileFormat", "tfrecord")
  if fmt not in FORMATS:
    raise ValueError(f"{directory}: file format {fmt!r} is not one of {FORMATS}; prepare the "
                     "copy again with --file_format=array_record")
  read = read_tfrecord if fmt == "tfrecord" else _read_array_record
  splits = []
  for split in ("train", "test"):
    pngs, labels = [], []
    for path, expected in _shard_paths(directory, info, split):
      if not path.is_file():
        raise ValueError(f"{path} is missing: {directory} is an incomplete TFDS copy, "
                         "prepare it again")
      records = read(path)
      if len(records) != expected:
        raise ValueError(f"{path}: {len(records)} records where dataset_info.json promises "
                         f"{expected}; the file is damaged, prepare the copy again")
      shard_pngs, shard_labels = _parse_examples(path, records)
      pngs += shard_pngs
      labels += shard_labels
    try:
      images = readers.decode_images(pngs)
    except OSError as e:  # PIL's error for a damaged PNG.
      raise ValueError(f"{directory}: a damaged image in split {split!r} ({e}); prepare the "
                       "copy again") from e
    if images.shape[1:] != (32, 32, 3):
      raise ValueError(f"{directory}: images of shape {images.shape[1:]}, expected (32, 32, 3):"
                       " not CIFAR-10")
    splits += readers.checked(directory, images, np.array(labels, np.int64))
  return readers.ImageDataset(*splits, description=(
      f"CIFAR-10 (TFDS {fmt} copy, {NAME}/{directory.name})"))


# Download with consent ----------------------------------------------------------------------
class DownloadError(OSError):
  """TFDS could not download or prepare CIFAR-10 (offline, disk full, checksum mismatch)."""


@contextlib.contextmanager
def _tfds_without_tensorflow():
  """Lets TFDS 4.9's cifar10 builder prepare a copy with TensorFlow absent.

  Three places need TensorFlow or a missing module, none of them for anything TF-specific:
  the builder reads the .bin files with tf.io.gfile (here: plain reads, same records), PNG
  encoding calls tf.image.encode_png (here: Pillow's lossless PNG; the pixels decode equal),
  and the checksum path imports `importlib_resources` (the stdlib's importlib.resources).
  """
  from unittest import mock

  from tensorflow_datasets.core.features import image_feature
  from tensorflow_datasets.image_classification import cifar
  from PIL import Image

  def load_data(path, labels_number=1):
    records = np.fromfile(path, np.uint8).reshape(-1, labels_number + readers.PIXELS)
    for record in records:
      yield record[:labels_number], record[labels_number:].reshape(3, 32, 32).transpose(1, 2, 0)

  def encode_png(self, image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()

  with mock.patch.dict(sys.modules, {"importlib_resources": importlib.resources}), \
      mock.patch.object(cifar, "_load_data", load_data), \
      mock.patch.object(image_feature._ImageEncoder, "_encode_image", encode_png):
    yield


def download(data_dir: Path) -> Path:
  """Downloads CIFAR-10 with TFDS (its checksum verified, its progress bars shown) and
  prepares an array_record copy in `data_dir/cifar10/<version>/`; returns `data_dir/cifar10`.

  TFDS prepares into `cifar10/incomplete.*`, renames it when done and removes it on failure
  (tests/test_data_tfds.py checks both); one left by a killed process is never read
  (version_dir). Raises DownloadError.
  """
  import tensorflow_datasets as tfds  # Slow import, only needed here.

  folder = data_dir / NAME
  fix = ("check the internet connection and free disk space (~400 MB), or get the data another "
         "way (README, 'Full CIFAR-10')")
  host = urllib.parse.urlparse(URL).hostname
  try:
    check_reachable(host)
  except OSError as e:
    raise DownloadError(f"cannot download CIFAR-10: {host} is unreachable ({e}); {fix}") from e
  logging.info("Downloading CIFAR-10 with TFDS into %s (array_record) ...", folder)
  try:
    with _tfds_without_tensorflow():
      builder = tfds.builder(NAME, data_dir=str(data_dir), file_format="array_record")
      builder.download_and_prepare()
  except Exception as e:  # Network, disk, checksum: TFDS raises many types.
    # The innermost OS error ("[Errno 28] No space left on device") where the message nests one.
    errno = re.findall(r"\[Errno [^\]]*\][^'\")(]*", str(e))
    reason = errno[-1].strip(" :") if errno else (str(e).strip().splitlines() or [""])[0][:200]
    raise DownloadError(f"downloading CIFAR-10 with TFDS into {data_dir} failed "
                        f"({type(e).__name__}: {reason}); {fix}") from e
  return folder


def check_reachable(host: str, timeout: float = 10.0) -> None:
  """Raises OSError when `host` takes no connection on port 443 within `timeout` seconds.

  Offline, TFDS retries ten times with back-off (3.5 minutes) before failing; this says so
  at once. Behind a proxy (https_proxy set) the direct connection proves nothing: skipped.
  """
  if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
    return
  socket.create_connection((host, 443), timeout=timeout).close()

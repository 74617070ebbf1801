"""CIFAR-10 (and Fashion-MNIST) found on disk or downloaded with consent, the embedded mini
set, a deterministic batch order and augmentation.

Everything is loaded into memory once as uint8 NHWC arrays (CIFAR-10 is 180 MB); batches are
then gathered by index. The batch order is a pure function of (seed, step), so the train
state's step is the whole iterator state: resuming a checkpoint restores the data order.

Sources (`load_dataset(source, data_dir)`):
  cifar10      full CIFAR-10: the first of cifar10_bin, cifar10_py, tfds found in the places
               searched (below); none found is an error (DataNotFoundError), never the subset.
  cifar10_bin  the official binary release folder `cifar-10-batches-bin/`.
  cifar10_py   the official python release folder `cifar-10-batches-py/` (torchvision, keras),
               unpickled admitting only the types those files hold (readers._BatchUnpickler).
  tfds         a prepared TFDS copy `cifar10/<version>/`, TFRecord or array_record, read
               without TensorFlow (tfds_copy).
  embedded     the first 2,000 train / 500 test images shipped in gfa_jax/assets (offline).
  auto         cifar10 where found, else the embedded subset with a warning (the configs of
               older runs; no shipped config uses it).
  fashion_mnist  the four IDX files of Fashion-MNIST (the paper's MLP setting; gzip or not):
               train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
               t10k-labels-idx1-ubyte, in `data_dir`, `data_dir/fashion-mnist/` or
               torchvision's `data_dir/FashionMNIST/raw/`; 28x28x1 images.

Places searched for CIFAR-10: the `data_dir` given (only it: a folder named by the user is where
the data is, a typo must not quietly read another copy); without one $GFA_DATA_DIR, then TFDS's
own places $TFDS_DATA_DIR and ~/tensorflow_datasets. `download=True` (--config.download) lets
TFDS download and prepare CIFAR-10 into the first of those when no copy is found.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax.data import readers, tfds_copy
from gfa_jax.data.readers import (CLASS_NAMES, EMBEDDED_PATH, FASHION_FILES, FASHION_FOLDERS,
                                  DataNotFoundError, ImageDataset, read_idx)
from gfa_jax.data.tfds_copy import DownloadError

__all__ = ["CLASS_NAMES", "EMBEDDED_PATH", "FASHION_FILES", "FASHION_FOLDERS", "DataNotFoundError",
           "DownloadError", "ImageDataset", "read_idx"]

DATA_DIR_ENV = "GFA_DATA_DIR"
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
SOURCES = ("cifar10", "cifar10_bin", "cifar10_py", "tfds", "embedded", "auto", "fashion_mnist")
DOWNLOADABLE = ("cifar10", "tfds")  # The sources download=True can fetch a copy for.
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1)}  # Every other source: CIFAR-10's (32, 32, 3).

# source -> (folder name, what it is, a file pattern that shows it is there, reader).
_FOLDERS = {
    "cifar10_bin": ("cifar-10-batches-bin", "official binary release", "*.bin",
                    readers.read_bin_release),
    "cifar10_py": ("cifar-10-batches-py", "official python release", "*_batch*",
                   readers.read_py_release),
    "tfds": ("cifar10", "TFDS copy, <version>/dataset_info.json", "*/dataset_info.json",
             tfds_copy.read_tfds_copy),
}


def image_shape(source: str) -> tuple[int, int, int]:
  """(H, W, C) of the images `source` yields: what a model for it is initialised with."""
  return IMAGE_SHAPES.get(source, (32, 32, 3))


def search_dirs(data_dir: str | None) -> list[Path]:
  """The folders searched for CIFAR-10, in order (module docstring): `data_dir` alone if
  given, else $GFA_DATA_DIR, $TFDS_DATA_DIR, ~/tensorflow_datasets (those set, no repeats)."""
  if data_dir:
    return [Path(data_dir).expanduser()]
  dirs = [os.environ.get(DATA_DIR_ENV), os.environ.get(TFDS_DATA_DIR_ENV), "~/tensorflow_datasets"]
  return list(dict.fromkeys(Path(d).expanduser() for d in dirs if d))


def _find(source: str, dirs: list[Path]) -> tuple[Path | None, object, list[str]]:
  """(the first folder holding a copy, its reader, the places looked before it)."""
  places = []
  for data_dir in dirs:
    for name in _FOLDERS if source in ("cifar10", "auto") else [source]:
      folder_name, what, marker, reader = _FOLDERS[name]
      folder = data_dir if data_dir.name == folder_name else data_dir / folder_name
      # A TFDS folder counts only with a finished version (not TFDS's incomplete.* folders).
      if any(folder.glob(marker)) and (name != "tfds" or tfds_copy.version_dir(folder)):
        return folder, reader, places
      places.append(f"{folder}  ({what})")
  return None, None, places


def _not_found_message(places: list[str], target: Path) -> str:
  looked = "".join(f"\n  {p}" for p in places)
  return (
      f"CIFAR-10 not found. Looked for:{looked}\n"
      "Get it with one of:\n"
      f"  --config.download=True  (TFDS downloads ~170 MB and prepares it in {target})\n"
      "  python ../shared/datasets/prepare_cifar10.py DIR  (our machines; the JPEG-75 copy)\n"
      "  torchvision.datasets.CIFAR10(DIR, download=True), keras.datasets.cifar10.load_data() "
      "(leaves ~/.keras/datasets/cifar-10-batches-py), or untar cifar-10-binary.tar.gz from "
      "https://www.cs.toronto.edu/~kriz/cifar.html into DIR\n"
      "  tfds build cifar10 --data_dir=DIR  (with TensorFlow installed)\n"
      f"then pass --config.data_dir=DIR or set {DATA_DIR_ENV}=DIR (a TFDS copy in "
      f"${TFDS_DATA_DIR_ENV} or ~/tensorflow_datasets is found without either); or train on "
      "the embedded 2,000-image subset with --config.data_source=embedded.")


def load_dataset(source: str = "cifar10", data_dir: str | None = None, *,
                 download: bool = False) -> ImageDataset:
  """Loads `source` (module docstring) into memory and returns it.

  `data_dir` is the folder that holds `cifar-10-batches-bin/`, `cifar-10-batches-py/` or the
  TFDS `cifar10/` folder, or one of those folders itself; without it the default places are
  searched. `download=True` lets TFDS fetch CIFAR-10 when no copy is found. Raises
  DataNotFoundError naming every place looked, ValueError for corrupt files, DownloadError.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
  if download and source not in DOWNLOADABLE:
    raise ValueError(f"download=True fetches CIFAR-10 with TFDS, not data source {source!r}; "
                     f"use one of {DOWNLOADABLE} or drop the download")
  if source == "embedded":
    return readers.read_embedded()
  if source == "fashion_mnist":
    return _load_fashion_mnist(data_dir or os.environ.get(DATA_DIR_ENV))
  dirs = search_dirs(data_dir)
  folder, reader, places = _find(source, dirs)
  if folder is None and download:
    folder, reader = tfds_copy.download(dirs[0]), tfds_copy.read_tfds_copy
  if folder is not None:
    # Which copy a run reads, said where the user sees it (the trainers log at WARNING); the
    # dataset's description, which reports quote, names no machine path.
    print(f"Reading CIFAR-10 from {folder}", file=sys.stderr, flush=True)
    return reader(folder)
  if source == "auto":
    logging.warning("CIFAR-10 not found (data source 'auto'); training on the embedded "
                    "2,000-image subset instead.")
    return readers.read_embedded()
  raise DataNotFoundError(_not_found_message(places, dirs[0]))


def _load_fashion_mnist(data_dir: str | None) -> ImageDataset:
  places = []
  if data_dir:
    folder, places = readers.find_fashion_mnist(Path(data_dir).expanduser())
    if folder is not None:
      return readers.read_fashion_mnist(folder)
  looked = "".join(f"\n  {p}" for p in places) or (
      f"\n  nowhere: no data directory given (--config.data_dir, ${DATA_DIR_ENV})")
  raise DataNotFoundError(
      f"Fashion-MNIST not found. Looked for:{looked}\nPut the four IDX files (from "
      "https://github.com/zalandoresearch/fashion-mnist) in DIR and pass "
      f"--config.data_dir=DIR or set {DATA_DIR_ENV}=DIR.")


# ---------------------------------------------------------------------------------------------
# Batch order and augmentation.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; the last partial batch is dropped (its examples come next epoch)."""
  if not 0 < batch_size <= num_examples:
    raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of training "
                     f"examples), got {batch_size}; lower the batch size")
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.flags.writeable = False  # Cached: callers must not change it.
  return permutation


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices (int64 [batch_size]) of the training examples in batch `step`.

  A pure function of its arguments: epoch e visits every example once, in the order of a
  permutation drawn from (seed, e), so a resumed run sees exactly the batches it would have.
  """
  if seed < 0 or step < 0:
    raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
  epoch, index = divmod(step, steps_per_epoch(num_examples, batch_size))
  permutation = _epoch_permutation(num_examples, seed, epoch)
  return permutation[index * batch_size:(index + 1) * batch_size].astype(np.int64)


def augment(key: jax.Array, images: jax.Array, *, crop_padding: int = 4,
            flip: bool = True) -> jax.Array:
  """Random crop after zero padding, then random horizontal flip, per image.

  `images` are float [B, H, W, C]; returns the same shape. Jit-able (`crop_padding` and
  `flip` are static). crop_padding=0, flip=False returns the images unchanged.
  """
  if images.ndim != 4 or crop_padding < 0:
    raise ValueError(f"need images [B, H, W, C] and crop_padding >= 0, got {images.shape} "
                     f"and {crop_padding}")
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    corners = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    crop = lambda image, corner: jax.lax.dynamic_slice(
        image, (corner[0], corner[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, corners)
  if flip:
    flipped = jax.random.bernoulli(flip_key, shape=(batch, 1, 1, 1))
    images = jnp.where(flipped, images[:, :, ::-1, :], images)
  return images


def to_float(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """uint8 images -> float32 in [0, 1] (numpy in, numpy out; jax in, jax out)."""
  if images.dtype != np.uint8:
    raise ValueError(f"to_float expects uint8 images, got {images.dtype}; float images are "
                     "already scaled")
  return images.astype(np.float32) / np.float32(255)


def first_examples(dataset: ImageDataset, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 in [0, 1], labels) of the first n examples of `split` ('train' or
  'test'), in order: what every evaluation reads. Warns when the split has fewer."""
  images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
  if n > len(labels):
    logging.warning("%s has only %d %s examples; evaluating all of them instead of %d.",
                    dataset.description, len(labels), split, n)
  return to_float(images[:n]), labels[:n]

"""CIFAR-10 (and Fashion-MNIST) readers, the embedded mini set, a deterministic batch order and
augmentation.

Everything is loaded into memory once as uint8 NHWC arrays (CIFAR-10 is 180 MB); batches are
then gathered by index. The batch order is a pure function of (seed, step), so the train
state's step is the whole iterator state: resuming a checkpoint restores the data order.

Sources (`load_dataset(source, data_dir)`):
  embedded     the first 2,000 train / 500 test images shipped in gfa_jax/assets (offline).
  cifar10_bin  the official binary release folder `cifar-10-batches-bin/`.
  cifar10_py   the official python release folder `cifar-10-batches-py/` (torchvision, keras).
  tfds         a prepared TFDS copy `cifar10/<version>/`, read with `tfds.data_source`.
  cifar10      the first of cifar10_bin, cifar10_py, tfds found in `data_dir`.
  auto         cifar10 when a data directory is given (argument or $GFA_DATA_DIR), else embedded.
  fashion_mnist  the four IDX files of Fashion-MNIST (the paper's MLP setting; gzip or not):
               train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
               t10k-labels-idx1-ubyte, in `data_dir`, `data_dir/fashion-mnist/` or
               torchvision's `data_dir/FashionMNIST/raw/`; 28x28x1 images.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import logging
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

DATA_DIR_ENV = "GFA_DATA_DIR"
SOURCES = ("auto", "embedded", "cifar10", "cifar10_bin", "cifar10_py", "tfds", "fashion_mnist")
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1)}  # Every other source: CIFAR-10's (32, 32, 3).
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
EMBEDDED_PATH = Path(__file__).parent / "assets" / "cifar10_subset.npz"
_PIXELS = 32 * 32 * 3  # One image, stored as red, green and blue 32x32 planes.


class DataNotFoundError(FileNotFoundError):
  """No copy of the requested data set exists where we looked."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A labelled image data set held in memory; validated on construction."""
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  description: str  # What the numbers were measured on, for reports.
  num_classes: int = 10

  def __post_init__(self):
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise ValueError(f"{split}_images must be non-empty uint8 [N, H, W, C], got "
                         f"{images.dtype} {images.shape} ({self.description})")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f"{split}_labels must be int32 [{len(images)}], got "
                         f"{labels.dtype} {labels.shape} ({self.description})")
      if labels.min() < 0 or labels.max() >= self.num_classes:
        raise ValueError(f"{split}_labels must lie in [0, {self.num_classes}), got "
                         f"[{labels.min()}, {labels.max()}] ({self.description})")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(f"train images {self.train_images.shape[1:]} and test images "
                       f"{self.test_images.shape[1:]} differ in shape ({self.description})")


# ---------------------------------------------------------------------------------------------
# Readers. Each takes the folder it was found in and returns an ImageDataset.


def _checked(path: Path, images: np.ndarray, labels: np.ndarray):
  """Returns (images, int32 labels) read from `path`, or a ValueError naming the file."""
  if len(labels) != len(images):
    raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels; the file is "
                     "corrupt, download or prepare it again")
  if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
    raise ValueError(f"{path}: labels outside [0, 10) ({labels.min()}..{labels.max()}); the "
                     "file is corrupt or not CIFAR-10, download or prepare it again")
  return images, labels.astype(np.int32)


def _planes_to_nhwc(rows: np.ndarray) -> np.ndarray:
  """[N, 3072] rows of R, G, B planes (both official layouts) -> uint8 [N, 32, 32, 3]."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_bin_file(path: Path):
  """One file of the binary release: records of 1 label byte and 3072 pixel bytes."""
  raw = np.fromfile(path, dtype=np.uint8)
  if not raw.size or raw.size % (1 + _PIXELS):
    raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {1 + _PIXELS}-byte "
                     "records (1 label byte, 3072 pixel bytes); the file is truncated or not "
                     "CIFAR-10, download or prepare it again")
  records = raw.reshape(-1, 1 + _PIXELS)
  return _checked(path, _planes_to_nhwc(records[:, 1:]), records[:, 0])


def _read_pickle_file(path: Path):
  """One file of the python release: a pickled dict with 'data' [N, 3072] and 'labels'.

  Pickle can run code when loaded: only point `data_dir` at files you trust.
  """
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")  # Written by Python 2: the keys are bytes.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
  except Exception as e:  # Unpickling garbage raises almost any exception type.
    raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); the "
                     "file is truncated or corrupt, download it again") from e
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
    raise ValueError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 "
                     f"[N, {_PIXELS}]; the file is corrupt or not CIFAR-10")
  return _checked(path, _planes_to_nhwc(data), labels)


def _read_release(folder: Path, read_file, suffix: str, layout: str) -> ImageDataset:
  """The five training batches and the test batch of an official release folder."""
  splits = []
  for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
    paths = [folder / f"{name}{suffix}" for name in names]
    for path in paths:
      if not path.is_file():
        raise ValueError(f"{path} is missing: {folder} is an incomplete CIFAR-10 copy, "
                         "download or prepare it again")
    parts = [read_file(path) for path in paths]
    splits += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
  return ImageDataset(*splits, description=f"CIFAR-10 ({layout}, {Path(folder).name})")


def _read_tfds(folder: Path) -> ImageDataset:
  """A prepared TFDS copy; `folder` is <tfds data_dir>/cifar10."""
  import tensorflow_datasets as tfds  # Slow import, only needed here.

  sources = tfds.data_source("cifar10", split=["train", "test"], data_dir=str(folder.parent),
                             download=False)
  splits = []
  for source in sources:
    # Item by item, once at load: tfds.testing.mock_data breaks `__getitems__` (4.9.10).
    examples = [source[i] for i in range(len(source))]
    splits += [np.stack([e["image"] for e in examples]),
               np.array([e["label"] for e in examples], np.int32)]
  return ImageDataset(*splits, description=f"CIFAR-10 (TFDS, {Path(folder).name})")


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Image i is the JPEG file blob[offsets[i]:offsets[i+1]]; returns uint8 [N, H, W, 3]."""
  return np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
                   for a, b in zip(offsets[:-1], offsets[1:])])


def _read_embedded() -> ImageDataset:
  """The subset made by scripts/make_embedded_subset.py (its provenance is stored inside)."""
  with np.load(EMBEDDED_PATH) as f:
    splits = []
    for split in ("train", "test"):
      splits += [_decode_jpegs(f[f"{split}_jpeg"], f[f"{split}_offsets"]),
                 f[f"{split}_labels"].astype(np.int32)]
  return ImageDataset(*splits, description=(
      f"CIFAR-10 embedded subset (JPEG-75 copy; first {len(splits[0])} train, first "
      f"{len(splits[2])} test images)"))


# source -> (folder name, what it is, a file pattern that shows it is there, reader).
_FOLDERS = {
    "cifar10_bin": ("cifar-10-batches-bin", "official binary release", "*.bin",
                    functools.partial(_read_release, read_file=_read_bin_file, suffix=".bin",
                                      layout="official binary layout")),
    "cifar10_py": ("cifar-10-batches-py", "official python release", "*_batch*",
                   functools.partial(_read_release, read_file=_read_pickle_file, suffix="",
                                     layout="official python layout")),
    "tfds": ("cifar10", "prepared TFDS copy, <version>/dataset_info.json",
             "*/dataset_info.json", _read_tfds),
}


def image_shape(source: str) -> tuple[int, int, int]:
  """(H, W, C) of the images `source` yields: what a model for it is initialised with."""
  return IMAGE_SHAPES.get(source, (32, 32, 3))


# Fashion-MNIST ------------------------------------------------------------------------------
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_FOLDERS = (".", "fashion-mnist", "FashionMNIST/raw")


def read_idx(path: Path) -> np.ndarray:
  """One IDX file (LeCun's MNIST format, gzip-compressed or not) as a uint8 array.

  The header is two zero bytes, a type byte (0x08: unsigned byte, the only one these data
  sets use), the number of dimensions and each dimension as a big-endian int32.
  """
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f"{path}: a damaged gzip file ({e}); download it again") from e
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {raw[:4].hex()}, "
                     "expected 0000 08 <ndim>); download it again")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4)) if (
      len(raw) >= 4 + 4 * ndim) else ()
  expected = 4 + 4 * ndim + int(np.prod(dims))
  if len(dims) != ndim or len(raw) != expected:
    raise ValueError(f"{path}: {len(raw)} bytes where the header {dims} promises {expected}; "
                     "the file is truncated, download it again")
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_file(folder: Path, name: str) -> Path | None:
  for candidate in (folder / name, folder / f"{name}.gz"):
    if candidate.is_file():
      return candidate
  return None


def _read_fashion_mnist(folder: Path) -> ImageDataset:
  """The four IDX files in `folder` -> uint8 [N, 28, 28, 1] images, int32 labels."""
  splits = []
  for split, names in FASHION_FILES.items():
    paths = [_fashion_file(folder, name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
      raise ValueError(f"{folder} has no {missing} (nor .gz): an incomplete Fashion-MNIST "
                       "copy, download the four IDX files again")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
      raise ValueError(f"{paths[0]} / {paths[1]}: shapes {images.shape} / {labels.shape}, "
                       "expected [N, 28, 28] images and [N] labels")
    images, labels = _checked(paths[1], images, labels)
    splits += [np.ascontiguousarray(images[..., None]), labels]
  return ImageDataset(*splits, description=f"Fashion-MNIST (IDX files, {folder.name or '.'})")


def _find_fashion_mnist(data_dir: Path) -> tuple[Path | None, list[str]]:
  places = []
  for sub in FASHION_FOLDERS:
    folder = data_dir / sub
    if _fashion_file(folder, FASHION_FILES["train"][0]):
      return folder, places
    places.append(f"{folder}  (Fashion-MNIST IDX files, e.g. {FASHION_FILES['train'][0]}.gz)")
  return None, places


def _not_found_message(places: list[str]) -> str:
  looked = "".join(f"\n  {p}" for p in places) or (
      f"\n  nowhere: no data directory given (argument, --config.data_dir, ${DATA_DIR_ENV})")
  return (
      f"CIFAR-10 not found. Looked for:{looked}\n"
      "Get it into a directory DIR with one of:\n"
      "  python ../shared/datasets/prepare_cifar10.py DIR  (our machines; the JPEG-75 copy)\n"
      "  torchvision.datasets.CIFAR10(DIR, download=True), keras.datasets.cifar10.load_data() "
      "(leaves ~/.keras/datasets/cifar-10-batches-py), or untar cifar-10-binary.tar.gz from "
      "https://www.cs.toronto.edu/~kriz/cifar.html into DIR\n"
      "  tfds build cifar10 --data_dir=DIR --file_format=array_record\n"
      f"then pass --config.data_dir=DIR or set {DATA_DIR_ENV}=DIR; or use the embedded "
      "subset (source 'embedded').")


def load_dataset(source: str = "auto", data_dir: str | None = None) -> ImageDataset:
  """Loads CIFAR-10 (see the module docstring for `source`) into memory.

  `data_dir` (else $GFA_DATA_DIR) is the folder that holds `cifar-10-batches-bin/`,
  `cifar-10-batches-py/` or the TFDS `cifar10/` folder, or one of those folders itself.
  Raises DataNotFoundError naming every place looked, ValueError for corrupt files.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  if source == "auto":
    source = "cifar10" if data_dir else "embedded"
  if source == "embedded":
    return _read_embedded()
  places = []
  if source == "fashion_mnist" and data_dir:
    folder, places = _find_fashion_mnist(Path(data_dir).expanduser())
    if folder is not None:
      return _read_fashion_mnist(folder)
    raise DataNotFoundError("Fashion-MNIST not found. Looked for:" + "".join(
        f"\n  {p}" for p in places) + "\nPut the four IDX files (from "
        "https://github.com/zalandoresearch/fashion-mnist) in DIR and pass "
        f"--config.data_dir=DIR or set {DATA_DIR_ENV}=DIR.")
  if data_dir:
    data_dir = Path(data_dir).expanduser()
    for name in _FOLDERS if source == "cifar10" else [source]:
      folder_name, what, marker, reader = _FOLDERS[name]
      folder = data_dir if data_dir.name == folder_name else data_dir / folder_name
      if any(folder.glob(marker)):
        return reader(folder)
      places.append(f"{folder}  ({what})")
  raise DataNotFoundError(_not_found_message(places))


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

"""Readers of the files people have: the official CIFAR-10 releases (binary, python), the
embedded subset, Fashion-MNIST's IDX files. Each returns an ImageDataset of uint8 arrays.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
EMBEDDED_PATH = Path(__file__).parent.parent / "assets" / "cifar10_subset.npz"
PIXELS = 32 * 32 * 3  # One image, stored as red, green and blue 32x32 planes.


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


def checked(path: Path, images: np.ndarray, labels: np.ndarray):
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
  if not raw.size or raw.size % (1 + PIXELS):
    raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {1 + PIXELS}-byte "
                     "records (1 label byte, 3072 pixel bytes); the file is truncated or not "
                     "CIFAR-10, download or prepare it again")
  records = raw.reshape(-1, 1 + PIXELS)
  return checked(path, _planes_to_nhwc(records[:, 1:]), records[:, 0])


def _latin1_bytes(text: str, encoding: str) -> bytes:
  """`_codecs.encode` as protocol-2 pickles written by Python 3 use it for bytes: latin1 only
  (another codec would be an arbitrary transform, not a byte string)."""
  if codecs.lookup(encoding).name != "iso8859-1":
    raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
  return codecs.encode(text, "latin1")


_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core.
# What a python batch holds besides dicts, lists, ints and strings (plain pickle opcodes): numpy
# arrays, rebuilt from (_reconstruct, ndarray, dtype). Python 2 wrote numpy.core, numpy 2
# writes numpy._core; both resolve to the same function.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _Refused(pickle.UnpicklingError):
  """The file asked for a global outside _PICKLE_GLOBALS."""


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles only the types a CIFAR-10 python batch holds: a poisoned file cannot run code
  (plain pickle calls whatever callable a file names, e.g. os.system)."""

  def find_class(self, module: str, name: str):
    try:
      return _PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise _Refused(f"{module}.{name}") from None


def _read_pickle_file(path: Path):
  """One file of the python release: a pickled dict with 'data' [N, 3072] and 'labels'."""
  try:
    with open(path, "rb") as f:
      # Written by Python 2: the keys and strings are bytes.
      batch = _BatchUnpickler(f, encoding="bytes").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
  except _Refused as e:
    raise ValueError(f"refusing to unpickle {e} from {path}: a CIFAR-10 python batch holds "
                     "only dicts, lists, strings and numpy arrays; the file is not one (or was "
                     "tampered with), download it again") from None
  except Exception as e:  # Unpickling garbage raises almost any exception type.
    raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); the "
                     "file is truncated or corrupt, download it again") from e
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
    raise ValueError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 "
                     f"[N, {PIXELS}]; the file is corrupt or not CIFAR-10")
  return checked(path, _planes_to_nhwc(data), labels)


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


def read_bin_release(folder: Path) -> ImageDataset:
  """`cifar-10-batches-bin/`: data_batch_1..5.bin, test_batch.bin, in the release's order."""
  return _read_release(folder, _read_bin_file, ".bin", "official binary layout")


def read_py_release(folder: Path) -> ImageDataset:
  """`cifar-10-batches-py/`: data_batch_1..5, test_batch, in the release's order."""
  return _read_release(folder, _read_pickle_file, "", "official python layout")


def decode_images(blobs) -> np.ndarray:
  """Encoded image files (PNG, JPEG; bytes each) -> uint8 [N, H, W, 3]."""
  return np.stack([np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs])


def read_embedded() -> ImageDataset:
  """The subset made by scripts/make_embedded_subset.py (its provenance is stored inside)."""
  with np.load(EMBEDDED_PATH) as f:
    splits = []
    for split in ("train", "test"):
      blob, offsets = f[f"{split}_jpeg"], f[f"{split}_offsets"]
      # Image i is the JPEG file blob[offsets[i]:offsets[i+1]].
      splits += [decode_images(blob[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])),
                 f[f"{split}_labels"].astype(np.int32)]
  return ImageDataset(*splits, description=(
      f"CIFAR-10 embedded subset (JPEG-75 copy; first {len(splits[0])} train, first "
      f"{len(splits[2])} test images)"))


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


def read_fashion_mnist(folder: Path) -> ImageDataset:
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
    images, labels = checked(paths[1], images, labels)
    splits += [np.ascontiguousarray(images[..., None]), labels]
  return ImageDataset(*splits, description=f"Fashion-MNIST (IDX files, {folder.name or '.'})")


def find_fashion_mnist(data_dir: Path) -> tuple[Path | None, list[str]]:
  """(the folder holding the IDX files or None, the places looked)."""
  places = []
  for sub in FASHION_FOLDERS:
    folder = data_dir / sub
    if _fashion_file(folder, FASHION_FILES["train"][0]):
      return folder, places
    places.append(f"{folder}  (Fashion-MNIST IDX files, e.g. {FASHION_FILES['train'][0]}.gz)")
  return None, places

#!/usr/bin/env python3
"""Make the CIFAR-10 subset embedded in the package (gfa_jax/assets/cifar10_subset.npz).

The subset lets the quickstart and the tests run on a fresh offline machine. It holds the
FIRST `--num-train` training and the FIRST `--num-test` test images of CIFAR-10 in the
official order (evaluation protocols take the first N test images in order, so the
embedded test set is a prefix of the full one).

The source is the JPEG-75 copy of CIFAR-10 (see shared/datasets/README.md). Its JPEG files
are copied byte for byte, not re-encoded, so the decoded pixels equal those of the full
JPEG-75 copy; zip compression squeezes out the header that every JPEG file repeats, leaving
~300 bytes an image. `gfa_jax.data.load_dataset("embedded")` decodes them with Pillow.

Usage (reproduces the shipped file; same inputs give the same arrays):
  python scripts/make_embedded_subset.py ../shared/datasets/cifar10_jpeg75.npz \
      --num-train 2000 --num-test 500 --out gfa_jax/assets/cifar10_subset.npz
"""
import argparse
import hashlib
import pathlib

import numpy as np

DEFAULT_OUT = pathlib.Path(__file__).parents[1] / "gfa_jax" / "assets" / "cifar10_subset.npz"


def take_prefix(blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray, count: int):
  """Returns (jpeg bytes, offsets, int32 labels) of the first `count` images."""
  if not 0 < count < len(offsets):
    raise ValueError(f"count must be in [1, {len(offsets) - 1}], got {count}")
  return blob[:offsets[count]].copy(), offsets[:count + 1].copy(), labels[:count].astype(np.int32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("npz", type=pathlib.Path, help="path of cifar10_jpeg75.npz")
  parser.add_argument("--num-train", type=int, default=2000, help="first N training images")
  parser.add_argument("--num-test", type=int, default=500, help="first N test images")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help="where to write the subset")
  args = parser.parse_args()

  source = np.load(args.npz)
  arrays = {}
  for split, count in (("train", args.num_train), ("test", args.num_test)):
    blob, offsets, labels = take_prefix(
        source[f"{split}_jpeg"], source[f"{split}_offsets"], source[f"{split}_labels"], count)
    arrays |= {f"{split}_jpeg": blob, f"{split}_offsets": offsets, f"{split}_labels": labels}

  sha256 = hashlib.sha256(args.npz.read_bytes()).hexdigest()
  provenance = (
      f"First {args.num_train} train and first {args.num_test} test images of CIFAR-10 in the "
      f"official order, JPEG files copied unchanged from {args.npz.name} (sha256 {sha256}), "
      "a quality-75 JPEG copy of CIFAR-10 (about 30 dB PSNR against the original pixels; "
      "report numbers as 'CIFAR-10 (JPEG-75 copy)'). Made by scripts/make_embedded_subset.py "
      f"--num-train {args.num_train} --num-test {args.num_test}.")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, provenance=np.array(provenance), **arrays)
  print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)\n{provenance}")


if __name__ == "__main__":
  main()

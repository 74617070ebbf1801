#!/usr/bin/env bash
# Prepares .device/, the ignored folder that scripts/gpu_check.sh needs on the GPU machine, where
# nothing can be fetched: run it here, then carry .device with the working tree.
#
#   bash scripts/gpu_prep.sh --data-npz PATH/cifar10_jpeg75.npz    # or $GFA_CIFAR_NPZ
#
# It writes
#   .device/cifar10/cifar-10-batches-bin/  the first 1,000 test images of the JPEG-75 CIFAR-10
#       copy (decoded here: the device need not have Pillow) in the official binary layout that
#       gfa_jax.data reads, and one training image per training file (the reader wants all
#       six files; nothing trains on them): 3 MB;
#   .device/site/  the pure-Python packages the device image lacks, copied from this
#       environment: ml_collections (gfa_jax imports it) and pyautoattack (the reference
#       AutoAttack) without its 45 MB examples/model_test.pt, which with the 48 MB of tracked
#       files would exceed the 64 MiB a device call carries (gpu_check.sh then attacks the
#       committed PGD-AT SmallCNN instead of the reference's ResNet-18; see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

npz="${GFA_CIFAR_NPZ:-}"
python="${PYTHON:-.venv/bin/python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data-npz) npz="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (use --data-npz PATH)" >&2; exit 2 ;;
  esac
done
if [[ -z "$npz" || ! -f "$npz" ]]; then
  echo "error: --data-npz PATH (or \$GFA_CIFAR_NPZ) must name cifar10_jpeg75.npz, got '${npz}'" >&2
  exit 2
fi

mkdir -p .device/site
"$python" - "$npz" .device/cifar10/cifar-10-batches-bin <<'EOF'
import sys
from pathlib import Path

import numpy as np

from gfa_jax.data.readers import decode_images

NUM_TEST = 1000
source, out = np.load(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def records(split, count):
  """The first `count` images of `split` as binary-release records (label, R, G, B planes)."""
  blob, offsets = source[f"{split}_jpeg"], source[f"{split}_offsets"]
  images = decode_images(blob[a:b].tobytes() for a, b in zip(offsets[:count], offsets[1:count + 1]))
  planes = images.transpose(0, 3, 1, 2).reshape(count, 3072)
  return np.concatenate([source[f"{split}_labels"][:count, None].astype(np.uint8), planes], 1)


records("test", NUM_TEST).tofile(out / "test_batch.bin")
train = records("train", 5)
for i in range(5):
  train[i:i + 1].tofile(out / f"data_batch_{i + 1}.bin")
print(f"wrote {out}: {NUM_TEST} test images, 5 training images")
EOF

site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for package in ml_collections pyautoattack; do
  rm -rf ".device/site/$package"
  cp -r "$site/$package" .device/site/
done
rm -f .device/site/pyautoattack/examples/model_test.pt .device/site/pyautoattack/examples/*.h5
find .device/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .device
echo "carry .device with the working tree; run: bash scripts/gpu_check.sh"

#!/usr/bin/env bash
# Issue 17's "no behaviour change" check: the same evaluations (fixed seeds) from two checkouts,
# then their numbers compared (timings and provenance ignored):
#   GFA_DATA_DIR=DATA bash scripts/eval_regression.sh OLD_CHECKOUT out/before
#   GFA_DATA_DIR=DATA bash scripts/eval_regression.sh .            out/after
#   python scripts/compare_results.py out/before out/after
set -euo pipefail
REPO=$1; OUT=$(realpath -m "$2"); mkdir -p "$OUT"
: "${GFA_DATA_DIR:?set GFA_DATA_DIR to the folder holding cifar-10-batches-bin/}"
PY=${PYTHON:-$(command -v python)}
cd "$REPO"; export JAX_PLATFORMS=cpu
M=results/pgd_at/params.msgpack
$PY eval.py --workdir $M --attack fgsm --eps 0,2/255,8/255 --num_examples 200 --output "$OUT/fgsm.json"
$PY eval.py --workdir $M --attack pgd --num_examples 200 --output "$OUT/pgd.json"
$PY eval.py --workdir $M --attack apgd --num_examples 200 --output "$OUT/apgd.json"
$PY eval.py --workdir $M --attack deepfool --norm l2 --num_examples 100 --output "$OUT/deepfool_l2.json"
$PY eval.py --workdir $M --attack checklist --budget quick --num_examples 50 \
    --surrogate results/standard_ce/params.msgpack --output "$OUT/checklist"
$PY eval.py --workdir $M --attack alignment --num_examples 200 --output "$OUT/alignment.json"
$PY eval.py --workdir $M --attack autoattack --num_examples 200 --output "$OUT/autoattack.json"

#!/usr/bin/env bash
# Issue 15: the full evaluation of one converged (30-epoch) model of scripts/converged.sh, on
# the first 1,000 CIFAR-10 test images (the checklist on the first 100, quick budget):
# standard AutoAttack, the APGD-CE eps curve, the gradient-masking checklist (transfer from the
# converged standard model) and the train/test alignment table. Each output is skipped if it
# exists, so the script resumes.
#   GFA_DATA_DIR=DATA taskset -c 0 bash scripts/converged_eval.sh NAME
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
: "${GFA_DATA_DIR:?set GFA_DATA_DIR to the folder holding cifar-10-batches-bin/}"
name=${1:?usage: converged_eval.sh NAME (a folder of results/converged/)}
M=results/converged/$name/params.msgpack OUT=results/converged/$name/eval
S=results/converged/standard_mse/params.msgpack
[[ -f $M ]] || { echo "error: $M does not exist — finish its run first (scripts/converged.sh)"; exit 2; }
run() { local out=$1; shift; [[ -e $out ]] && { echo "exists: $out"; return; }; python eval.py --workdir "$M" --output "$out" "$@"; }
run $OUT/autoattack.json --attack autoattack --num_examples 1000
run $OUT/apgd_curve.json --attack apgd --eps 0,1/255,2/255,4/255,8/255 --num_examples 1000
surrogate=(); [[ $name != standard_mse ]] && surrogate=(--surrogate "$S")
run $OUT/checklist --attack checklist --budget quick --num_examples 100 "${surrogate[@]}"
run $OUT/alignment.json --attack alignment --num_examples 1000

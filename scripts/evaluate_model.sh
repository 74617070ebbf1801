#!/usr/bin/env bash
# The evaluation protocol of docs/results.md for one model: every attack, the eps curves,
# minimum-norm attacks, OnePixel, the gradient-masking checklist and the per-layer alignment.
#   scripts/evaluate_model.sh MODEL OUT [SURROGATE]
# MODEL: a training workdir or params-only .msgpack; OUT: folder for the JSON; SURROGATE: a
# standard-trained model for the checklist's transfer attack. Data: $GFA_DATA_DIR.
# Linf attacks use the first 1,000 test images, standalone Square (5,000 queries) the first 200
# (AutoAttack already runs Square on all 1,000); the eps curves of AutoAttack and Square the
# first 200, without 8/255 (scripts/results_tables.py reads that point from the 8/255 run);
# CW, EAD, OnePixel and the checklist the first 100 (their reference budgets cost 10-50x more
# per image). A finished JSON is not redone.
# SKIP="cw onepixel checklist" (any of apgd_curve, autoattack_curve, square_curve, cw, ead,
# onepixel, checklist) skips costly parts. All of it took 1-2 h per model on a 2-core CPU
# (OnePixel and AutoAttack the most).
set -euo pipefail
MODEL=${1:?model}; OUT=${2:?output folder}; SURROGATE=${3:-}
PY=${PYTHON:-python}
mkdir -p "$OUT"
wanted() { [[ " ${SKIP:-} " != *" $1 "* ]]; }
run() {  # run NAME ARGS...: one eval.py call writing OUT/NAME.json, unless that exists.
  local name=$1; shift
  [[ -e "$OUT/$name.json" ]] && return 0
  echo "== $name $(date +%T)"
  $PY eval.py --workdir "$MODEL" "$@" --output "$OUT/$name.json"
}
CURVE=1/255,2/255,4/255,8/255,16/255
run fgsm --attack fgsm --eps $CURVE
run pgd --attack pgd --eps $CURVE
if wanted apgd_curve; then run apgd_curve --attack apgd --eps $CURVE; fi
run autoattack --attack autoattack
run square --attack square --num_examples 200
CURVE_BUT_8=1/255,2/255,4/255,16/255
if wanted autoattack_curve; then
  run autoattack_curve --attack autoattack --eps $CURVE_BUT_8 --num_examples 200
fi
if wanted square_curve; then
  run square_curve --attack square --eps $CURVE_BUT_8 --num_examples 200
fi
run deepfool --attack deepfool
run deepfool_l2 --attack deepfool --norm l2
run alignment --attack alignment
if wanted cw; then run cw_l2 --attack cw --norm l2 --num_examples 100 --batch_size 100; fi
if wanted ead; then run ead_l1 --attack ead --norm l1 --num_examples 100 --batch_size 100; fi
if wanted onepixel; then run onepixel --attack onepixel --num_examples 100; fi
if wanted checklist && [[ ! -e "$OUT/checklist/checklist.json" ]]; then  # Writes a folder.
  echo "== checklist $(date +%T)"
  $PY eval.py --workdir "$MODEL" --attack checklist --budget quick --num_examples 100 \
    ${SURROGATE:+--surrogate "$SURROGATE"} --output "$OUT/checklist"
fi

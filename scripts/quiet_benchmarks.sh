#!/usr/bin/env bash
# Issue 18's benchmark set, each run twice on a quiet machine, one after another (resumable).
#   GFA_DATA_DIR=... bash scripts/quiet_benchmarks.sh [DATE]     # from the repo root
#   ONLY=autoattack GFA_DATA_DIR=... bash scripts/quiet_benchmarks.sh [DATE]  # names matching
# Writes results/benchmarks/<name>_<DATE>_run<k>.jsonl (stdout) and .log (stderr); a run's file
# appears only once it finished, so a run killed half-way is redone and a finished one kept.
# Before each run it waits until the 1-minute load average is under 1 (up to 10 minutes) and
# logs the load it started at.
set -euo pipefail
DATA=${GFA_DATA_DIR:?set GFA_DATA_DIR to the folder holding cifar-10-batches-bin/}
DATE=${1:-$(date +%F)}
OUT=results/benchmarks
export JAX_PLATFORMS=cpu
unset JAX_COMPILATION_CACHE_DIR  # every AutoAttack run compiles from scratch, as a user's first
mkdir -p "$OUT"

bench() {  # bench NAME ARGS...: one run of `python -m ARGS` into $OUT/NAME_$DATE_run$RUN.jsonl
  local name=$1; shift
  local file="$OUT/${name}_${DATE}_run${RUN}.jsonl"
  [[ $name =~ ${ONLY:-.} ]] || return 0
  if [[ -f $file ]]; then echo "kept $file"; return; fi
  for _ in $(seq 60); do
    awk '{exit !($1 < 1)}' /proc/loadavg && break
    sleep 10
  done
  echo "$(date -u +%FT%TZ) start $file, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  if python -m "$@" > "$file.part" 2> "${file%.jsonl}.log"; then
    mv "$file.part" "$file"
  else
    echo "$(date -u +%FT%TZ) FAILED $file (see ${file%.jsonl}.log)"
  fi
}

for RUN in 1 2; do
  bench train_step benchmarks.train_step --batch 128 --peer
  bench conv_shifted_matmul scripts.conv_shifted_matmul --batch 128
  bench scaling benchmarks.scaling --steps 2 --rounds 2 --warmup 1
  bench autoattack_smallcnn200 benchmarks.attacks --cases autoattack,reference_autoattack \
      --steps 1 --rounds 1 --checkpoint results/pgd_at/params.msgpack --data-dir "$DATA" \
      --num-images 200 --batch 200
  bench autoattack_smallcnn1000 benchmarks.attacks --cases autoattack,reference_autoattack \
      --steps 1 --rounds 1 --checkpoint results/pgd_at/params.msgpack --data-dir "$DATA" \
      --num-images 1000 --batch 250
  bench forward_resnet18 benchmarks.attacks --cases forward,torch_forward --model resnet18 \
      --batch 64 --steps 10 --rounds 5
  bench autoattack_resnet18 benchmarks.attacks --cases autoattack,reference_autoattack \
      --steps 1 --rounds 1 --model resnet18 --data-dir "$DATA" --num-images 200 --batch 200
done

#!/usr/bin/env bash
# The GPU check (issue 34 part 6), one script of at most 8 minutes, for the device machine:
#   bash scripts/gpu_prep.sh --data-npz PATH/cifar10_jpeg75.npz   # here, once: fills .device/
#   bash scripts/gpu_check.sh                # there, carrying .device; $OUT collects the results
#   bash scripts/gpu_check.sh --smoke        # here: every section at tiny sizes on the CPU
# (GPU_CHECK_SMOKE=1 is --smoke.) The device has its own JAX (0.11, CUDA), Flax and PyTorch
# (CUDA) and no network: the project runs on them through PYTHONPATH, nothing is installed;
# .device/site holds the pure-Python packages that image lacks (ml_collections, pyautoattack).
#
# Sections, in this order, each under its own `timeout` and the whole under BUDGET_S, each
# writing its JSON as soon as it ends (a section cut short keeps the earlier ones):
#   env        versions, devices and nvidia-smi                    -> $OUT/env.json
#   xla_cpu_flag  whether this jaxlib knows gfa_jax.xla_flags' CPU flag (status only)
#   tests      the tests that matter on an accelerator (TESTS)     -> tests_gpu_DATE.json
#   autoattack standard AutoAttack on 1,000 test images, gfa-jax against the reference
#              (pyautoattack in torch) on the same GPU             -> autoattack_gpu_DATE.jsonl
#   train_*    the train step, standard and GFA-DEEP, JAX and the PyTorch peer on the same GPU,
#              per model (SmallCNN, ResNet-18, WRN-28-10) and dtype (float32, bfloat16)
#                                                                  -> train_step_gpu_DATE.jsonl
# plus gpu_check_gpu_DATE.jsonl (each section's status and seconds), under
# $OUT/results/benchmarks/, and $OUT/gpu_check.log (every command's stderr, pytest's output):
# 6 files, the device returns 8 at most. $OUT defaults to runs/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=${GPU_CHECK_SMOKE:-0}
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    *) echo "error: unknown argument $arg (the only one is --smoke)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-runs/gpu_check}
DATE=$(date -u +%F)
RES="$OUT/results/benchmarks"
LOG="$OUT/gpu_check.log"
mkdir -p "$RES"
: > "$LOG"
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD:$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch workers share the one GPU
unset JAX_COMPILATION_CACHE_DIR             # compile times are a user's first ones
DATA_DIR=${GFA_GPU_DATA_DIR:-.device/cifar10}  # gpu_prep.sh's 1,000 test images
# The AutoAttack model: the reference's ResNet-18 where its 45 MB weights came along (they do
# not fit the device's 64 MiB beside the tracked files), else the committed PGD-AT SmallCNN.
if "$PYTHON" -c 'import sys; from benchmarks import reference
sys.exit(not reference.resnet18_path().is_file())' 2>/dev/null; then
  AA_MODEL=(--model resnet18)
else
  AA_MODEL=(--checkpoint results/pgd_at/params.msgpack)
fi

if [[ $smoke == 1 ]]; then
  export JAX_PLATFORMS=cpu
  BUDGET_S=170
  TORCH_DEVICE=cpu
  TESTS=(tests/test_objectives.py::test_beta_schedule_delays_then_ramps tests/test_xla_flags.py)
  TRAIN_RUNS=("small_cnn float32" "wrn10_1 bfloat16")  # a BatchNorm model cast, small
  TRAIN_FLAGS=(--batch 4 --steps 1 --warmup 0 --rounds 1)
  AA_FLAGS=(--num-images 6 --batch 6 --eps 0.5)  # eps 0.5: APGD-CE breaks all, stages skip
  AA_MODEL=(--checkpoint results/pgd_at/params.msgpack)
  LIMIT_TESTS=60 LIMIT_TRAIN=70 LIMIT_AA=80
else
  export JAX_PLATFORMS=cuda
  BUDGET_S=450  # each section's kill may add 10 s
  TORCH_DEVICE=cuda
  # Fast files whose results depend on the backend's numerics: GFA's penalty and objectives,
  # the attack core, the models (conv_same's explicit VJPs), BatchNorm training, and the
  # AutoAttack breakdown on a closed-form model; and JAX's compile events (gfa_jax.profiling),
  # whose names a new JAX could change, which would zero AutoAttack's compile seconds.
  TESTS=(tests/test_penalty.py tests/test_objectives.py tests/test_attacks_core.py
         tests/test_models.py tests/test_train_batchnorm.py tests/test_profiling.py
         tests/test_evaluate.py::test_autoattack_matches_closed_form_with_consistent_breakdown)
  TRAIN_RUNS=("small_cnn float32" "small_cnn bfloat16" "resnet18 float32" "resnet18 bfloat16"
              "wrn28_10 float32" "wrn28_10 bfloat16")
  TRAIN_FLAGS=(--batch 128 --steps 20 --warmup 3 --rounds 4)
  AA_FLAGS=(--num-images 1000 --batch 500)
  # env ~15 + tests 75 + AutoAttack 120 + train 2 x (35 + 45 + 60) = 490 at most; most end
  # sooner, and BUDGET_S cuts the last ones (WRN-28-10 bfloat16 first) should they not. (The
  # tests took 160 s on 2 loaded CPU cores.)
  LIMIT_TESTS=75 LIMIT_AA=120 LIMIT_TRAIN=45  # SmallCNN's runs get 10 s less, WRN-28-10's 15 more
fi

START=$SECONDS
SECTIONS="$RES/gpu_check_gpu_$DATE.jsonl"
: > "$SECTIONS"

# section NAME LIMIT_S STDOUT CMD...: runs CMD under min(LIMIT_S, time left), its stdout appended
# to STDOUT and its stderr to the log, and records how it ended. Never fails the script.
section() {
  local name=$1 limit=$2 stdout=$3 left status rc=0 t0=$SECONDS
  shift 3
  left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 10)); then
    status=skipped_no_budget limit=0
  else
    ((limit > left)) && limit=$left
    local command="$*"
    echo "== $name (limit ${limit} s): ${command:0:300}" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$stdout" 2>> "$LOG" || rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=timeout ;;
      *) status="failed_rc_$rc" ;;
    esac
  fi
  printf '{"section": "%s", "status": "%s", "seconds": %d, "limit_s": %d}\n' \
    "$name" "$status" $((SECONDS - t0)) "$limit" >> "$SECTIONS"
  echo "== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
}

# --- env: what ran, on what ---------------------------------------------------------------------
SMI=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
      || echo "no nvidia-smi")
export SMI GPU_CHECK_SMOKE=$smoke GPU_CHECK_DATA="$DATA_DIR" GPU_CHECK_AA_MODEL="${AA_MODEL[*]}"
: > "$OUT/env.json"
section env 40 "$OUT/env.json" "$PYTHON" -c '
import importlib.metadata as md, json, os, platform

def version(name):
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return None

def read(get):  # a setting a newer JAX or PyTorch may have renamed: its absence, not a crash
  try:
    return str(get())
  except Exception as error:
    return f"unreadable: {type(error).__name__}"

import jax, torch
print(json.dumps({
    "smoke": os.environ["GPU_CHECK_SMOKE"] == "1", "python": platform.python_version(),
    "versions": {n: version(n) for n in (
        "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "chex",
        "orbax-checkpoint", "numpy", "torch", "pyautoattack", "ml_collections", "pytest")},
    "jax_backend": jax.default_backend(),
    "jax_devices": [str(d.device_kind) for d in jax.devices()],
    "jax_default_matmul_precision": read(lambda: jax.config.jax_default_matmul_precision),
    "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch_tf32": {"matmul": read(lambda: torch.backends.cuda.matmul.allow_tf32),
                   "cudnn": read(lambda: torch.backends.cudnn.allow_tf32),
                   "float32_matmul_precision": read(torch.get_float32_matmul_precision)},
    "nvidia_smi": os.environ["SMI"].strip(),
    # gpu_prep.sh: the first 1,000 test images of the JPEG-75 CIFAR-10 copy, binary layout
    "data_dir": os.environ["GPU_CHECK_DATA"], "autoattack_model": os.environ["GPU_CHECK_AA_MODEL"],
    "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}, indent=1))
'

# Does this jaxlib still know the XLA CPU flag train.py and eval.py set (gfa_jax.xla_flags)? An
# unknown flag in $XLA_FLAGS aborts every process that starts a backend.
section xla_cpu_flag 30 "$LOG" \
  env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot "$PYTHON" -c \
  "import jax.numpy as jnp; print('XLA CPU flag accepted', float(jnp.ones(3).sum()))"

# --- tests --------------------------------------------------------------------------------------
timeout_flags=()
# pytest-timeout, where installed (the device has it), stops one hung test, not the section.
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && timeout_flags=(-p timeout --timeout 60)
WORK=$(mktemp -d)  # pytest's own files: $OUT returns 8 files at most
trap 'rm -rf "$WORK"' EXIT
# Full float32 matmuls: these tests hold the code's numerics to float32 tolerances; the GPU's
# default (TF32 matmuls and convolutions) is what the benchmarks below time. No -x: the JSON
# counts every failure (up to 10), not the first.
export JAX_DEFAULT_MATMUL_PRECISION=highest
section tests "$LIMIT_TESTS" "$WORK/pytest.out" \
  "$PYTHON" -m pytest -v -m "not slow" --maxfail=10 -p no:cacheprovider "${timeout_flags[@]}" \
  --junitxml="$WORK/tests.xml" "${TESTS[@]}"
unset JAX_DEFAULT_MATMUL_PRECISION
cat "$WORK/pytest.out" >> "$LOG"
# Counts from pytest's -v lines, so a section cut short by its timeout still reports the tests
# that ran; the junit report (written only at the end) says whether pytest finished.
"$PYTHON" - "$WORK" "$RES/tests_gpu_$DATE.json" "$SECTIONS" "${TESTS[@]}" <<'PY'
import collections
import json
import re
import sys
from pathlib import Path

work, target, sections, tests = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
status = [json.loads(line) for line in open(sections)][-1]["status"]
outcomes = {}
for line in (work / "pytest.out").read_text(errors="replace").splitlines():
  match = re.match(r"(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
  if match:  # a test whose teardown errs prints twice: keep the worse outcome
    if outcomes.get(match[1]) not in ("FAILED", "ERROR"):
      outcomes[match[1]] = match[2]
counts = collections.Counter(outcomes.values())
record = {"name": "tests", "section_status": status, "selection": tests,
          "pytest_finished": (work / "tests.xml").is_file(),
          **{k.lower(): counts[k] for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL")},
          "not_passed": sorted(f"{t} ({o})" for t, o in outcomes.items()
                               if o in ("FAILED", "ERROR", "XPASS"))}
with open(target, "w") as f:
  json.dump(record, f, indent=1)
print(json.dumps(record))
PY

# --- AutoAttack: gfa-jax against the reference, both on the GPU ---------------------------------
AA="$RES/autoattack_gpu_$DATE.jsonl"
: > "$AA"
section autoattack "$LIMIT_AA" "$AA" \
  "$PYTHON" -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
  "${AA_MODEL[@]}" --data-dir "$DATA_DIR" --torch-device "$TORCH_DEVICE" --plain-xla \
  "${AA_FLAGS[@]}"

# --- train step: JAX against the PyTorch peer, per model and dtype ------------------------------
TRAIN="$RES/train_step_gpu_$DATE.jsonl"
: > "$TRAIN"
for run in "${TRAIN_RUNS[@]}"; do
  read -r model dtype <<< "$run"
  limit=$LIMIT_TRAIN
  [[ $model == small_cnn ]] && limit=$((LIMIT_TRAIN - 10))
  [[ $model == wrn28_10 ]] && limit=$((LIMIT_TRAIN + 15))
  section "train_${model}_$dtype" "$limit" "$TRAIN" \
    "$PYTHON" -m benchmarks.train_step --model "$model" --dtype "$dtype" --peer \
    --cases standard,gfa_deep --torch-device "$TORCH_DEVICE" --plain-xla "${TRAIN_FLAGS[@]}"
done

echo "gpu_check: $((SECONDS - START)) s of $BUDGET_S; results in $RES" | tee -a "$LOG"
cat "$SECTIONS"

#!/usr/bin/env bash
# The exact commands behind results/ (CIFAR-10 JPEG-75 copy, 2-core CPU). Run from the repo root.
# Data: python ../shared/datasets/prepare_cifar10.py "$DATA" writes $DATA/cifar-10-batches-bin/.
set -euo pipefail
DATA=${GFA_DATA_DIR:?set GFA_DATA_DIR to the folder holding cifar-10-batches-bin/}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

# --- docs/results.md (issue 7): eight SmallCNN models, 5 epochs each -------------------------
train() {  # train NAME CONFIG [OVERRIDES...]: runs/NAME, then results/NAME/params.msgpack.
  local name=$1 config=$2; shift 2
  python train.py --config "$config" --workdir "runs/$name" --config.data_dir="$DATA" \
      --config.num_epochs=5 "$@"
  mkdir -p "results/$name"
  python scripts/export_params.py "runs/$name" "results/$name/params.msgpack"
  cp "runs/$name/metrics.jsonl" "results/$name/metrics.jsonl"
}
train standard_mse configs/cifar_standard.py
train standard_ce configs/cifar_standard.py --config.task_loss=ce
train gfa_deep configs/cifar_deep.py                                   # beta 0.1, MSE
train gfa_first configs/cifar_first.py                                 # beta 0.1, MSE
train gfa_deep_ce configs/cifar_deep.py --config.task_loss=ce --config.beta=3.0
train gradalign configs/cifar_gradalign.py
train pgd_at configs/cifar_pgd_at.py
train trades configs/cifar_trades.py

# The beta sweep (10,000 training images, 5 epochs per variant; resumable), and its
# architecture checks (2 epochs): ResNet-20 with the paper's taps, and with taps layer1-3 since
# its layer0 cannot align; the ViT (with a short warm-up) with the paper's taps.
python scripts/beta_sweep.py --data-dir "$DATA" --workdir runs/beta_sweep --output results/beta_sweep
python scripts/beta_sweep.py --data-dir "$DATA" --model resnet20 --epochs 2 \
    --workdir runs/beta_sweep_resnet20 --output results/beta_sweep_resnet20 \
    --only standard,deep_mse_b0.05,deep_mse_b0.1,deep_l123_mse_b0.03,deep_l123_mse_b0.1,deep_l123_mse_b1.0
python scripts/beta_sweep.py --data-dir "$DATA" --model vit --epochs 2 --warmup-epochs 0.5 \
    --workdir runs/beta_sweep_vit --output results/beta_sweep_vit \
    --only standard,deep_mse_b0.05,deep_mse_b0.1,deep_mse_b1.0

# Every model under every attack (scripts/evaluate_model.sh lists them), then the tables.
# The sweep's edge model (beta 0.06, seed 0) under the same protocol.
mkdir -p results/gfa_deep_edge
python scripts/export_params.py runs/beta_sweep/deep_mse_b0.06 results/gfa_deep_edge/params.msgpack
cp runs/beta_sweep/deep_mse_b0.06/metrics.jsonl results/gfa_deep_edge/metrics.jsonl

for model in standard_mse standard_ce gfa_first gfa_deep gfa_deep_ce gfa_deep_edge pgd_at \
    trades gradalign; do
  scripts/evaluate_model.sh "results/$model/params.msgpack" "results/$model/eval" \
      results/standard_mse/params.msgpack
done
python scripts/results_tables.py

# --- Earlier runs (issues 4 and 5): 10-epoch standard model, 3-epoch GFA-DEEP --------------
# Training (10 epochs standard, 3 epochs GFA-DEEP beta 0.1; Adam 1e-3 cosine, batch 128).
python train.py --config configs/cifar_standard.py --workdir runs/cifar_standard \
    --config.data_dir="$DATA" --config.num_epochs=10
python train.py --config configs/cifar_deep.py --workdir runs/cifar_deep_short \
    --config.data_dir="$DATA" --config.num_epochs=3
python scripts/export_params.py runs/cifar_standard results/cifar_standard/params.msgpack
python scripts/export_params.py runs/cifar_deep_short results/cifar_deep_short/params.msgpack

# Attacks on the standard model (Linf 8/255 on the first 1,000 test images; the costly
# minimum-norm and OnePixel attacks at their reference budgets on the first 100).
M=results/cifar_standard/params.msgpack
OUT=results/cifar_standard/eval
for a in fgsm pgd apgd apgd-t square autoattack deepfool; do
  python eval.py --workdir $M --attack $a --num_examples 1000 --output $OUT/$a.json
done
python eval.py --workdir $M --attack deepfool --norm l2 --num_examples 1000 --output $OUT/deepfool_l2.json
python eval.py --workdir $M --attack fab --num_examples 100 --batch_size 100 --output $OUT/fab.json
python eval.py --workdir $M --attack onepixel --num_examples 100 --output $OUT/onepixel.json
python eval.py --workdir $M --attack cw --norm l2 --num_examples 100 --batch_size 100 --output $OUT/cw_l2.json
python eval.py --workdir $M --attack ead --norm l1 --num_examples 100 --batch_size 100 --output $OUT/ead_l1.json

# Gradient-masking checklist (quick budget, first 100 test images), alignment, mechanism.
python eval.py --workdir $M --attack checklist --budget quick --num_examples 100 \
    --output results/cifar_standard/checklist
python eval.py --workdir results/cifar_deep_short/params.msgpack --attack checklist --budget quick \
    --num_examples 100 --surrogate $M --output results/cifar_deep_short/checklist
python eval.py --workdir $M --attack alignment --num_examples 1000 --output results/cifar_standard/alignment.json
python eval.py --workdir results/cifar_deep_short/params.msgpack --attack mechanism --compare $M \
    --num_examples 100 --output results/mechanism

# --- docs/results.md, second round (issue 15): the paper's other readings (resumable) --------
python scripts/beta_sweep.py --data-dir "$DATA" --workdir runs/round2 \
    --output results/beta_sweep_round2 --group round2
# The 30-epoch runs on the full training set (resumable across sessions; `snapshot` first
# when a session ends): standard (MSE), GFA detached beta 1, PGD-AT.
taskset -c 1 bash scripts/converged.sh
# Their evaluation (AutoAttack and the APGD-CE curve on 1,000 test images, checklist, alignment).
for m in standard_mse gfa_detached_b1 pgd_at; do taskset -c 0 bash scripts/converged_eval.sh $m; done

# --- docs/validation.md (issue 14): gfa-jax beside the reference AutoAttack, per example -----
# Needs the [crosscheck] extra. Resumable: each command skips the runs already in its JSON.
cc() { taskset -c 0 python scripts/crosscheck_reference.py --data-dir "$DATA" "$@"; }
P=results/pgd_at/params.msgpack
cc --model $P --eps 8/255 --num-examples 1000 --attacks apgd-ce,apgd-t --seeds 0
cc --model resnet18 --eps 1/255 --num-examples 200 --attacks apgd-ce,apgd-t --seeds 0
cc --model $P --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 1
for m in standard_ce standard_mse gfa_first gfa_deep gfa_deep_ce gfa_deep_edge trades gradalign; do
  cc --model results/$m/params.msgpack --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
done
cc --model $P --eps 8/255 --num-examples 200 --attacks square,fab-t,autoattack --seeds 0
cc --model resnet18 --norm l2 --eps 0.25 --num-examples 200 --attacks apgd-ce --seeds 0
cc --model resnet18 --eps 2/255 --num-examples 200 --attacks apgd-ce --seeds 0
cc --model $P --norm l2 --eps 0.5 --num-examples 1000 --attacks apgd-ce,apgd-t --seeds 0
cc --model resnet18 --eps 1/255 --num-examples 200 --attacks apgd-ce --seeds 1
cc --model resnet18 --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
cc --model $P --eps 8/255 --num-examples 1000 --attacks apgd-t --seeds 1
# After the compacted Square (559854e) and FAB-T run as the reference's stage (ba3b3ac): our
# older runs of those attacks are redone (--ours-since), the reference's kept.
cc --model $P --eps 8/255 --num-examples 200 --attacks square,autoattack --seeds 0,1 --ours-since 559854e
cc --model $P --eps 8/255 --num-examples 200 --attacks fab-t --seeds 0,1 --ours-since ba3b3ac
for m in trades gradalign gfa_deep_edge standard_mse gfa_deep gfa_first gfa_deep_ce standard_ce; do
  cc --model results/$m/params.msgpack --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
done
cc --model $P --norm l2 --eps 0.5 --num-examples 200 --attacks autoattack --seeds 0
cc --model $P --eps 8/255 --num-examples 200 --attacks fab-t --seeds 0,1 --ours-since c77b80c
# The ResNet-18 rows of issue 14's last stop: two queues, one side each on its own core, into
# their own subfolders (--tables merges them); about 1-2 h a side per command.
q() { taskset -c $1 python scripts/crosscheck_reference.py --data-dir "$DATA" --impls $2 \
        --output results/crosscheck/q_$2 "${@:3}"; }
for side in "0 gfa-jax" "1 reference"; do (
  q $side --model resnet18 --eps 2/255 --num-examples 200 --attacks autoattack --seeds 0
  q $side --model resnet18 --norm l2 --eps 0.25 --num-examples 200 --attacks autoattack --seeds 0
  q $side --model resnet18 --eps 1/255 --num-examples 200 --attacks autoattack --seeds 0
  q $side --model resnet18 --eps 1/255 --num-examples 200 --attacks fab-t --seeds 0
  # Square alone: at 1/255 on 100 images (200 had not finished after 3 h a side).
  q $side --model resnet18 --eps 8/255 --num-examples 200 --attacks square --seeds 0
  q $side --model resnet18 --eps 1/255 --num-examples 100 --attacks square --seeds 0,1
) & done; wait
python scripts/crosscheck_reference.py --tables

# --- benchmarks/attacks.py (issue 18): standard AutoAttack, gfa-jax vs the reference ---------
# On a quiet machine (load average under 1), twice.
python -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
    --checkpoint results/pgd_at/params.msgpack --data-dir "$DATA" --num-images 1000 --batch 250
python -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
    --model resnet18 --data-dir "$DATA" --num-images 200 --batch 200
# The convolution backend (Eigen, train.py's flag, vs YNNPACK) and the ResNet-18 forward pass
# against the reference's torch module (benchmarks/README.md, 2026-12-04), twice each, quiet.
for t in 1 2; do
  python -m benchmarks.attacks --cases forward,forward@ynnpack,torch_forward --model resnet18 \
      --batch 64 --threads $t --steps 10 --rounds 5
done
python -m benchmarks.train_step --batch 128 --threads 1 \
    --cases standard,standard@ynnpack,gfa_deep,gfa_deep@ynnpack
# Quiet AutoAttack, gfa-jax vs the reference, PGD-AT SmallCNN, 200 images (benchmarks/README.md,
# 2026-12-04): run 1 with an empty compilation cache, run 2 with the cache run 1 filled.
export JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
for run in 1 2; do
  python -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
      --checkpoint results/pgd_at/params.msgpack --data-dir "$DATA" --num-images 200 --batch 200
done
unset JAX_COMPILATION_CACHE_DIR
# Issue 18's figures of 2026-12-07 (benchmarks/README.md, "Issue 18 on one quiet day"): the train
# step against the peer, the conv-as-matmuls lever, the scaling curve, and the standard
# AutoAttack against the reference (SmallCNN PGD-AT on 1,000 images, the ResNet-18 on 200), each
# twice, one after another; resumable. The train-step, scaling and SmallCNN AutoAttack files ran
# at 9d5d7b6, before models.conv_same_subsampled (the scaling's ResNet rows change with it), and
# so did autoattack_resnet18_at9d5d7b6_*, the ResNet-18 AutoAttack before that change (renamed
# from run1); the conv-lever, forward and ResNet-18 AutoAttack files ran after it.
bash scripts/quiet_benchmarks.sh 2026-12-07
# The ResNet-18 forward pass before that change, from a checkout of 9d5d7b6, twice, quiet:
for r in 1 2; do
  python -m benchmarks.attacks --cases forward,torch_forward --model resnet18 --batch 64 \
      --steps 10 --rounds 5 > "results/benchmarks/forward_resnet18_at9d5d7b6_2026-12-07_run$r.jsonl"
done

# --- docs/validation.md, "Minimum-norm attacks" (issue 36): DeepFool, CW, EAD, FGSM, PGD and
# OnePixel per example beside foolbox 3.3.4 and torchattacks 3.5.1 (the [crosscheck] extra);
# resumable per (model, attack) unit under results/crosscheck/minnorm/, one core.
mn() { taskset -c 1 python scripts/crosscheck_minnorm.py --data-dir "$DATA" "$@"; }
mn --models standard_mse,pgd_at,gfa_deep --attacks cw,cw-bs,ead-l1,deepfool-l2,deepfool-linf,fgsm,pgd
mn --models resnet18 --attacks deepfool-l2,deepfool-linf,fgsm,pgd,cw
mn --models standard_mse,pgd_at,gfa_deep --attacks onepixel
mn --models resnet18 --attacks cw-bs,ead-l1
python scripts/crosscheck_minnorm.py --tables

# --- docs/results.md: CW-L2 / EAD-L1 with the reference's whole-batch abort (issue 36) ------
# Resumable: a model's file is skipped once written. GFA_DATA_DIR: the CIFAR-10 folder.
for m in standard_mse gfa_deep_edge pgd_at trades gradalign standard_ce gfa_first gfa_deep gfa_deep_ce; do
  mkdir -p results/rerun_minnorm/$m
  [ -f results/rerun_minnorm/$m/cw_l2.json ] || python eval.py --workdir results/$m/params.msgpack \
    --attack cw --norm l2 --num_examples 100 --batch_size 100 --output results/rerun_minnorm/$m/cw_l2.json
  [ -f results/rerun_minnorm/$m/ead_l1.json ] || python eval.py --workdir results/$m/params.msgpack \
    --attack ead --norm l1 --num_examples 100 --batch_size 100 --output results/rerun_minnorm/$m/ead_l1.json
done

# --- Issue 34 part 5: AutoAttack with compaction (APGD-CE, APGD-T, FAB-T stop a point once it
# fools; every target in one compiled call). benchmarks/README.md, "AutoAttack against the
# reference after compaction": the three paired runs, twice, quiet machine, resumable.
ONLY=autoattack bash scripts/quiet_benchmarks.sh 2026-12-07-compact
# docs/validation.md: our side of every SmallCNN cross-check row rerun with that code (the
# reference's runs are kept; runs by code older than b23d6ff are redone), two cores in parallel.
xc() { python scripts/crosscheck_reference.py --impls gfa-jax --ours-since b23d6ff --data-dir "$DATA" "$@"; }
xc --model results/gfa_deep_ce/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/gfa_deep_ce/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/gfa_deep_edge/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/gfa_deep_edge/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/gfa_deep/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/gfa_deep/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/gfa_first/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/gfa_first/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/gradalign/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/gradalign/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/pgd_at/params.msgpack --norm l2 --eps 0.5 --num-examples 1000 --attacks apgd-ce,apgd-t --seeds 0
xc --model results/pgd_at/params.msgpack --norm l2 --eps 0.5 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/pgd_at/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce,apgd-t --seeds 0,1
xc --model results/pgd_at/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack,fab-t,square --seeds 0,1
xc --model results/standard_ce/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/standard_ce/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/standard_mse/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/standard_mse/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
xc --model results/trades/params.msgpack --norm linf --eps 8/255 --num-examples 1000 --attacks apgd-ce --seeds 0
xc --model results/trades/params.msgpack --norm linf --eps 8/255 --num-examples 200 --attacks autoattack --seeds 0
python scripts/crosscheck_reference.py --tables

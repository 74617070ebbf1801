"""The GFA beta sweep of docs/results.md: clean accuracy vs alignment vs APGD robust accuracy.

  python scripts/beta_sweep.py --data-dir DATA --workdir runs/sweep --output results/beta_sweep

Every variant trains GFA on the first `--num-train` CIFAR-10 training images (base config
configs/cifar_deep.py plus the variant's overrides), then APGD-CE (Linf 8/255, 100 iterations)
attacks its first `--num-attack` test images. One JSON line per variant is appended to
OUTPUT/sweep.jsonl as it finishes; a rerun skips the variants already there, so the sweep
survives interruptions (and a killed variant resumes from its own checkpoint). A run that
diverges (non-finite loss) is recorded as such, not dropped. `--plot` redraws the figures only.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import cifar_deep  # noqa: E402
from gfa_jax import batching, checkpoints, data, evaluate, plots, train_lib, xla_flags  # noqa: E402

FIRST = ("layer0",)
DEEP = cifar_deep.get_config().gfa_layers  # The taps of every variant that sets none.

# (name, overrides of configs/cifar_deep.py), in the order they run: the paper's setting
# around its transition, then the ways out of it (CE, MSE on logits, FIRST, delayed or ramped
# beta), then the rest of the constant-beta grid and seeds at the transition.
VARIANTS = [
    ("standard", {"objective": "standard"}),  # The reference: no penalty.
    *[(f"deep_mse_b{b}", {"beta": b}) for b in (0.05, 0.07, 0.1)],
    *[(f"deep_ce_b{b}", {"beta": b, "task_loss": "ce"}) for b in (0.3, 1.0, 3.0, 10.0)],
    *[(f"deep_mselogits_b{b}", {"beta": b, "mse_outputs": "logits"}) for b in (0.3, 1.0)],
    *[(f"first_mse_b{b}", {"beta": b, "gfa_layers": FIRST}) for b in (0.1, 1.0)],
    ("deep_mse_delay_b0.1", {"beta": 0.1, "beta_ramp_start_epochs": 2.0, "beta_ramp_epochs": 2.0}),
    ("deep_mse_ramp_b0.1", {"beta": 0.1, "beta_ramp_epochs": 5.0}),
    *[(f"deep_mse_b{b}", {"beta": b}) for b in (0.06, 0.15)],
    *[(f"deep_mse_b0.06_seed{s}", {"beta": 0.06, "seed": s}) for s in (1, 2)],
    # Per-layer beta at beta 0.07 (constant weights collapse there): the same mean weight, put
    # on the input, on the middle layer or on the deepest tap.
    *[(f"deep_mse_w{'-'.join(map(str, w))}_b0.07", {"beta": 0.07, "gfa_layer_weights": w})
      for w in ((2.0, 0.5, 0.5), (0.5, 2.0, 0.5), (0.5, 0.5, 2.0))],
]
# --group round2 (issue 15): the paper's other readings and settings, each with a beta grid
# wide enough to locate its transition (refined where the outcome changes). Each family's
# reference without the penalty runs first. `model` overrides config.model.name.
SGD = {"optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 5e-4}  # The usual CIFAR recipe.
ROUND2 = [
    # Detached dL/dh (PyTorch's autograd.grad without create_graph): trains only through h.
    *[(f"deep_mse_detached_b{b}", {"beta": b, "gfa_gradient": "detached"})
      for b in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)],
    # The literal formula alpha*MSE - beta*(1 - cos): cosines pushed towards -1.
    *[(f"deep_mse_anti_b{b}", {"beta": b, "gfa_direction": "anti"})
      for b in (0.01, 0.03, 0.1, 0.3, 1.0)],
    # The paper's MLP setting (three hidden layers), on CIFAR-10 as the stand-in for
    # Fashion-MNIST, which no machine here has.
    ("mlp_standard", {"model": "mlp", "objective": "standard"}),
    *[(f"mlp_deep_mse_b{b}", {"model": "mlp", "beta": b}) for b in (0.01, 0.03, 0.1, 0.3, 1.0)],
    # SGD, momentum 0.9, lr 0.05, weight decay 5e-4, cosine decay, beside the Adam 1e-3 default.
    ("sgd_standard", {**SGD, "objective": "standard"}),
    *[(f"sgd_deep_mse_b{b}", {**SGD, "beta": b}) for b in (0.01, 0.03, 0.06, 0.1, 0.3)],
    # The critical-path sum over layers instead of the mean (beta / 3 matches the mean's scale).
    *[(f"deep_mse_sum_b{b}", {"beta": b, "gfa_reduction": "sum"})
      for b in (0.01, 0.02, 0.03, 0.05)],
    # Refinements where the first grid's outcome changed, and seeds at the edges: detached
    # never aligned up to beta 10 (does it at all?); anti collapsed between 0.1 and 0.3; the
    # MLP between 0.03 and 0.1; SGD degraded from 0.06 to 0.3; sum's edge is 0.02.
    *[(f"deep_mse_detached_b{b}", {"beta": b, "gfa_gradient": "detached"}) for b in (30.0, 100.0)],
    *[(f"deep_mse_anti_b{b}", {"beta": b, "gfa_direction": "anti"}) for b in (0.15, 0.2)],
    *[(f"mlp_deep_mse_b{b}", {"model": "mlp", "beta": b}) for b in (0.05, 0.07)],
    *[(f"sgd_deep_mse_b{b}", {**SGD, "beta": b}) for b in (0.15, 0.2)],
    ("deep_mse_anti_b0.2_seed1", {"beta": 0.2, "gfa_direction": "anti", "seed": 1}),
    ("mlp_deep_mse_b0.07_seed1", {"model": "mlp", "beta": 0.07, "seed": 1}),
    ("deep_mse_sum_b0.02_seed1", {"beta": 0.02, "gfa_reduction": "sum", "seed": 1}),
    ("deep_mse_detached_b1.0_seed1", {"beta": 1.0, "gfa_gradient": "detached", "seed": 1}),
]
GROUPS = {"round1": VARIANTS, "round2": ROUND2}

# Run only when named in --only, for the architecture checks: a large beta at the paper's taps,
# and the taps moved one layer deeper for networks whose input alignment is 0 by construction
# (ResNet-20: a bias-free stem conv feeding GroupNorm).
ON_REQUEST = [
    ("deep_mse_b1.0", {"beta": 1.0}),
    *[(f"deep_l123_mse_b{b}", {"beta": b, "gfa_layers": ("layer1", "layer2", "layer3")})
      for b in (0.03, 0.1, 1.0)],
]


def variants_to_run(only: set[str], done: set[str], group: str = "round1"
                    ) -> list[tuple[str, dict]]:
  """The (name, overrides) still to train, in run order: those named in `only` (from the
  group or ON_REQUEST), or else all of the group, less the `done` ones; exits on an unknown
  name."""
  variants = GROUPS[group] + ON_REQUEST
  unknown = only - {name for name, _ in variants}
  if unknown:
    raise SystemExit(f"unknown variants {sorted(unknown)} in group {group}; see GROUPS and "
                     f"ON_REQUEST in {__file__}")
  wanted = only or {name for name, _ in GROUPS[group]}
  return [(name, overrides) for name, overrides in variants
          if name in wanted and name not in done]


def variant_config(overrides: dict, args):
  config = cifar_deep.get_config()
  overrides = dict(overrides)
  config.model.name = overrides.pop("model", args.model)
  config.update({"data_dir": args.data_dir, "num_train": args.num_train,
                 "num_epochs": args.epochs, "num_eval_examples": args.num_eval,
                 "warmup_epochs": args.warmup_epochs, "eval_every_steps": 0,
                 "checkpoint_every_steps": 100, **overrides})
  # The tables and the figure read every variant's train/test alignment, the references
  # without the penalty included.
  config.eval_alignment = True
  return config


def run_variant(name: str, overrides: dict, args, attack_images, attack_labels) -> dict:
  """Trains one variant and attacks it on the given test images; returns its JSON record."""
  config = variant_config(overrides, args)
  workdir = Path(args.workdir) / name
  start = time.perf_counter()
  record = {"name": name, "overrides": overrides, "model": overrides.get("model", args.model),
            "num_train": args.num_train, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs}
  try:
    final = train_lib.train_and_evaluate(config, workdir)
  except FloatingPointError as e:
    return {**record, "diverged": str(e), "seconds": time.perf_counter() - start}
  apply_fn, variables = checkpoints.load_model(workdir)
  report = evaluate.evaluate(batching.bind(apply_fn, variables), attack_images, attack_labels,
                             attack="apgd", eps=[8 / 255], progress=False)
  return {**record, "final_eval": final, "apgd_clean_accuracy": report["clean_accuracy"],
          "apgd_robust_accuracy": report["robust_accuracy"][0],
          "num_attacked": args.num_attack, "seconds": time.perf_counter() - start}


def plot(records: list[dict], output: Path) -> None:
  """One figure, three panels against beta: test accuracy, alignment, APGD robust accuracy."""
  families: dict[str, list[dict]] = {}
  for r in records:
    if "final_eval" in r and "beta" in r["overrides"]:
      families.setdefault(r["name"].rsplit("_b", 1)[0], []).append(r)

  def mean_alignment(r):
    taps = r["overrides"].get("gfa_layers", DEEP)
    return sum(r["final_eval"][f"train/alignment/{tap}"] for tap in taps) / len(taps)
  panels = {"test accuracy": {}, "train alignment (mean of the tapped layers)": {},
            "APGD-CE robust accuracy, 8/255": {}}
  for family, rs in families.items():
    rs = sorted((r for r in rs if "seed" not in r["name"]), key=lambda r: r["overrides"]["beta"])
    betas = [r["overrides"]["beta"] for r in rs]
    for panel, values in zip(panels.values(), (
        [r["final_eval"]["test/accuracy"] for r in rs], [mean_alignment(r) for r in rs],
        [r["apgd_robust_accuracy"] for r in rs])):
      panel[family] = (betas, values)
  plots.plot_panels(output / "beta_sweep.png", panels, xlabel="beta (final value)", logx=True,
                    ylim=(-0.05, 1.0),
                    reference_lines={"test accuracy": {"chance": 0.1},
                                     "APGD-CE robust accuracy, 8/255": {"chance": 0.1}})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True, help="folder with cifar-10-batches-bin/")
  parser.add_argument("--workdir", default="runs/beta_sweep", help="one training dir per variant")
  parser.add_argument("--output", default="results/beta_sweep", help="sweep.jsonl + plots")
  parser.add_argument("--num-train", type=int, default=10000, help="training images")
  parser.add_argument("--epochs", type=int, default=5, help="epochs per variant")
  parser.add_argument("--warmup-epochs", type=float, default=0.0,
                      help="linear learning-rate warm-up (the ViT needs some)")
  parser.add_argument("--num-eval", type=int, default=2000, help="test images for accuracy")
  parser.add_argument("--num-attack", type=int, default=200, help="test images APGD attacks")
  parser.add_argument("--model", default="small_cnn", help="gfa_jax.models.MODELS key")
  parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  parser.add_argument("--group", default="round1", choices=sorted(GROUPS),
                      help="round1: docs/results.md's sweep; round2: detached, anti, MLP, SGD, sum")
  parser.add_argument("--plot", action="store_true", help="only redraw the plots")
  args = parser.parse_args()
  xla_flags.use_fast_cpu_convolutions()
  output = Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  results = output / "sweep.jsonl"
  records = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
  if not args.plot:
    pending = variants_to_run(set(filter(None, args.only.split(","))),
                              done={r["name"] for r in records}, group=args.group)
    # The attacked test images, loaded once for every variant (same data as training uses).
    dataset = data.load_dataset(cifar_deep.get_config().data_source, args.data_dir)
    attack_images = data.to_float(dataset.test_images[:args.num_attack])
    attack_labels = dataset.test_labels[:args.num_attack]
    for name, overrides in pending:
      record = run_variant(name, overrides, args, attack_images, attack_labels)
      records.append(record)
      with results.open("a") as f:  # One complete line per finished variant.
        f.write(json.dumps(record, allow_nan=False) + "\n")
      print(json.dumps({k: record.get(k) for k in ("name", "apgd_robust_accuracy", "diverged")}))
  plot(records, output)


if __name__ == "__main__":
  main()

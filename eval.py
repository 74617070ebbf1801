"""Evaluates a checkpoint under attack: `python eval.py --workdir DIR --attack apgd`.

`--eps 0,1/255,2/255,4/255,8/255` gives a robust-accuracy-vs-eps curve in one call; `--attack all`
runs every attack that supports `--norm`. Test examples are the first `--num_examples` of the
test split of the data set the run was trained on, in order. The JSON written to `--output` is
documented in docs/evaluation.md.
"""

import json
import os
from pathlib import Path

import jax
import ml_collections
from absl import flags, logging

from gfa_jax import (analysis, batching, checklist, checkpoints, cli, data, evaluate, objectives,
                     plots, torch_import, xla_flags)
from gfa_jax.attacks import core

_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/quickstart",
    "Training workdir, or a params-only .msgpack checkpoint (then the data set comes from "
    "$GFA_DATA_DIR, else the embedded subset).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ATTACK = flags.DEFINE_string(
    "attack", None, f"Attack: one of {', '.join(evaluate.attack_names())}; or 'checklist' "
    "(gradient-masking checks), 'alignment' (per-layer train/test GFA alignment) or "
    "'mechanism' (radial vs tangential sensitivity and loss landscapes).")
_EPS = flags.DEFINE_string(
    "eps", None, "eps, or a comma-separated list for a curve; fractions allowed (8/255). "
    "Default: 8/255 (linf), 0.5 (l2), 12 (l1).")
_NORM = flags.DEFINE_string("norm", "linf", "Threat model norm: linf, l2 or l1 (EAD only).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "First N test examples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 500, "Images per model call (memory bound).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Result JSON (default: <workdir>/eval/<attack>_<norm>.json).")
_PLOT = flags.DEFINE_string("plot", None, "Optional PNG of robust accuracy vs eps.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data folder (default: $GFA_DATA_DIR, else the run's config).")
_SURROGATE = flags.DEFINE_string(
    "surrogate", None, "checklist: workdir or .msgpack of a standard-trained model for the "
    "transfer attack of check 3 (without it, check 3 reports WARN 'not run').")
_COMPARE = flags.DEFINE_string(
    "compare", None, "mechanism: workdir or .msgpack of a second model (e.g. standard-trained) "
    "measured and drawn beside the first.")
_BUDGET = flags.DEFINE_enum(
    "budget", "default", ["default", "quick"], "checklist: attack budget (docs/checklist.md).")
_SUBSET = flags.DEFINE_string(
    "subset", None, "File of example indices (whitespace/comma separated or a JSON list): "
    "also report robust accuracy on those examples only (the paper's protocol).")
_AA_VERSION = flags.DEFINE_enum(
    "aa_version", "standard", ["standard", "rand", "fast", "custom"],
    "autoattack: the version (docs/evaluation.md). 'fast' (APGD-CE + APGD-T) is not the "
    "standard AutoAttack and is never reported as such.")
_AA_ATTACKS = flags.DEFINE_list(
    "aa_attacks", [], "autoattack --aa_version custom: the attacks in order, from apgd-ce, "
    "apgd-dlr, apgd-t, fab, fab-t, square.")
_TORCH_MODEL = flags.DEFINE_string(
    "torch_model", None, "Evaluate a PyTorch state_dict file (.pt/.pth) instead of --workdir "
    "(needs torch; see --arch). Data: --data_dir, else $GFA_DATA_DIR, else the embedded subset.")
_ARCH = flags.DEFINE_enum(
    "arch", "resnet18", ["resnet18", "preact_resnet18"],
    "--torch_model's architecture (gfa_jax.torch_import): 'resnet18' (Kuang Liu / the "
    "reference AutoAttack's example) or 'preact_resnet18' (RobustBench's PreActResNet18).")
flags.mark_flag_as_required("attack")

DEFAULT_EPS = {"linf": "8/255", "l2": "0.5", "l1": "12"}


def read_subset(path: str) -> list[int]:
  """Example indices from a JSON list or whitespace/comma-separated integers ('#' comments)."""
  text = Path(path).read_text()
  try:
    values = json.loads(text)
  except json.JSONDecodeError:
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    values = " ".join(lines).replace(",", " ").split()
  ints = []
  for v in values if isinstance(values, list) else [values]:
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.isdigit())):
      raise ValueError(f"--subset {path}: {v!r} is not an example index; write integers >= 0 "
                       "(a JSON list or whitespace/comma separated)")
    ints.append(int(v))
  return ints


def load_split(config, split: str, num_examples: int):
  """(images float32 [N, H, W, C] in [0, 1], labels int32 [N], description): the first N
  examples of `split` of the data set the run was trained on (--data_dir, else $GFA_DATA_DIR,
  else the run's own data_dir)."""
  data_dir = _DATA_DIR.value or os.environ.get(data.DATA_DIR_ENV) or config.data_dir or None
  dataset = data.load_dataset(config.data_source, data_dir)  # num_examples: check_flags
  images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
  if num_examples > len(labels):
    logging.warning("%s has only %d %s examples; evaluating all of them instead of %d.",
                    dataset.description, len(labels), split, num_examples)
  return data.to_float(images[:num_examples]), labels[:num_examples], dataset.description


def summary(report: dict) -> str:
  """A few lines for the terminal; the JSON has everything."""
  lines = [f"clean accuracy {100 * report['clean_accuracy']:.2f}% "
           f"on {report['num_examples']} examples ({report['norm']})"]
  eps_text = ", ".join(f"{e:.4g}" for e in report["eps"])
  for name, r in report["attacks"].items():
    if r["kind"] == evaluate.L0:
      acc = f"{100 * r['robust_accuracy']:.2f}% with {r['threat_model']['pixels']} pixel(s)"
    else:
      acc = ", ".join(f"{100 * a:.2f}%" for a in r["robust_accuracy"]) + f" at eps [{eps_text}]"
    extra = ""
    if r["kind"] == evaluate.MIN_NORM:
      median = r["norms"][report["norm"]]["median"]
      extra = f"; success {100 * r['success_rate']:.1f}%, median {report['norm']} " + (
          "n/a" if median is None else f"{median:.4g}")
    if "label" in r:
      extra += f"; {r['label']}"
    lines.append(f"{name:>10}: robust {acc}{extra}  ({r['elapsed_seconds']:.1f} s)")
    for eps_value, checks in zip(report["eps"], r.get("checks", [])):
      lines += [f"{'':>12}check {c['check']} at eps {eps_value:.4g}: WARNING {c['message']}"
                for c in checks if c["status"] == "warn"]
  if report["attack"] == evaluate.ALL:
    lines.append(f"{'worst case':>10}: robust "
                 + ", ".join(f"{100 * a:.2f}%" for a in report["robust_accuracy"]))
  for name, reason in report["skipped"].items():
    lines.append(f"{name:>10}: skipped ({reason})")
  if report.get("degenerate"):
    lines.append(f"WARNING: this model is {report['degenerate']}")
  return "\n".join(lines)


def default_output(workdir: Path, name: str) -> Path:
  return (workdir if workdir.is_dir() else workdir.parent) / "eval" / name


def run_attacks(config, apply_fn, variables, workdir: Path, step) -> None:
  norm = _NORM.value
  eps = core.parse_eps_list(_EPS.value or DEFAULT_EPS.get(norm, "0"))
  subset = read_subset(_SUBSET.value) if _SUBSET.value else None
  images, labels, description = load_split(config, "test", _NUM_EXAMPLES.value)
  overrides = None
  if _ATTACK.value == "autoattack" and (_AA_VERSION.value != "standard" or _AA_ATTACKS.value):
    overrides = {"version": _AA_VERSION.value, "attacks": tuple(_AA_ATTACKS.value)}
  report = evaluate.evaluate(
      batching.bind(apply_fn, variables), images, labels, attack=_ATTACK.value, eps=eps,
      norm=norm, batch_size=_BATCH_SIZE.value, seed=_SEED.value, subset=subset,
      overrides=overrides)
  print(f"data: {description}")
  report.update(
      checkpoint={"path": str(workdir), "step": step}, data=description,
      eps_text=_EPS.value or DEFAULT_EPS[norm], subset_file=_SUBSET.value,
      git_commit=evaluate.git_commit())
  output = Path(_OUTPUT.value or default_output(workdir, f"{_ATTACK.value}_{norm}.json"))
  output.parent.mkdir(parents=True, exist_ok=True)
  checkpoints.write_atomically(output, json.dumps(report, allow_nan=False).encode())
  print(summary(report))
  print(f"wrote {output}")
  if _PLOT.value:
    evaluate.plot_robust_accuracy(report, _PLOT.value)
    print(f"wrote {_PLOT.value}")


def run_checklist(config, apply_fn, variables, workdir: Path) -> None:
  eps = core.parse_eps_list(_EPS.value or DEFAULT_EPS[_NORM.value])
  if len(eps) != 1:
    raise ValueError(f"--attack checklist takes one --eps (it sweeps eps itself), got {eps}.")
  images, labels, _ = load_split(config, "test", _NUM_EXAMPLES.value)
  out_dir = Path(_OUTPUT.value or default_output(workdir, f"checklist_{_NORM.value}"))
  surrogate = checkpoints.load_model(_SURROGATE.value) if _SURROGATE.value else None
  report = checklist.run_checklist(
      apply_fn, variables, images, labels, key=jax.random.key(_SEED.value), eps=eps[0],
      norm=_NORM.value, out_dir=out_dir, surrogate=surrogate, budget=_BUDGET.value,
      batch_size=_BATCH_SIZE.value, progress=True)
  for check in report["checks"]:
    print(f"{check['id']}. {check['name']}: {check['status']} - {check['verdict']}")
  print(f"wrote {out_dir}/checklist.md")


def run_alignment(config, apply_fn, variables, workdir: Path) -> None:
  splits = {split: load_split(config, split, _NUM_EXAMPLES.value)[:2]
            for split in ("train", "test")}
  table = analysis.alignment_table(apply_fn, variables, splits,
                                   objectives.make_task_loss(config),
                                   batch_size=_BATCH_SIZE.value)
  output = Path(_OUTPUT.value or default_output(workdir, "alignment.json"))
  output.parent.mkdir(parents=True, exist_ok=True)
  checkpoints.write_atomically(output, json.dumps(
      {"alignment": table, "num_examples": _NUM_EXAMPLES.value, "checkpoint": str(workdir),
       "task_loss": config.task_loss}, indent=2).encode())
  print(analysis.alignment_markdown(table))
  print(f"wrote {output}")


def model_label(path: Path) -> str:
  """A model's name in plots: the run folder, also for results/<run>/params.msgpack."""
  return path.parent.name if path.suffix == ".msgpack" and path.stem == "params" else path.stem


def run_mechanism(config, apply_fn, variables, workdir: Path) -> None:
  """Radial vs tangential numbers and loss landscapes (docs/checklist.md), for the model and
  the optional --compare model, drawn side by side."""
  images, labels, _ = load_split(config, "test", _NUM_EXAMPLES.value)
  models = {model_label(workdir): (apply_fn, variables)}
  if _COMPARE.value:
    label = model_label(Path(_COMPARE.value))
    if label in models:
      raise ValueError(f"--compare {_COMPARE.value} has the same name as --workdir ({label}); "
                       "rename one of them.")
    models[label] = checkpoints.load_model(_COMPARE.value)
  out_dir = Path(_OUTPUT.value or default_output(workdir, "mechanism"))
  out_dir.mkdir(parents=True, exist_ok=True)
  report = {}
  for label, (fn, model_variables) in models.items():
    report[label] = {
        "radial_tangential": analysis.radial_tangential(
            fn, model_variables, images, labels, batch_size=_BATCH_SIZE.value),
        # Landscapes cost num**2 forward passes per image and plane: the first 64 images.
        "landscape": analysis.loss_landscape(
            fn, model_variables, images[:64], labels[:64], key=jax.random.key(_SEED.value)),
    }
  plots.plot_radial_tangential(out_dir / "radial_tangential.png",
                               {k: v["radial_tangential"] for k, v in report.items()})
  plots.plot_landscapes(out_dir / "landscape.png", {k: v["landscape"] for k, v in report.items()})
  checkpoints.write_atomically(out_dir / "mechanism.json",
                               json.dumps(report, allow_nan=False).encode())
  for label, r in report.items():
    for layer, numbers in r["radial_tangential"]["layers"].items():
      print(f"{label} {layer}: cos(g, h) {numbers['cosine']['mean']:+.3f}, median d_t/|d_r| "
            f"{numbers['tangential_over_radial']['median']:.3g}")
  print(f"wrote {out_dir}/mechanism.json, radial_tangential.png, landscape.png")


ANALYSES = ("checklist", "alignment", "mechanism")


def check_flags() -> None:
  """Flag combinations that would fail (or mislead) only after the work: refused first."""
  if _OUTPUT.value and _ATTACK.value not in ("checklist", "mechanism") and Path(_OUTPUT.value).is_dir():
    raise ValueError(f"--output {_OUTPUT.value} is a folder; give the JSON file to write "
                     f"(e.g. {Path(_OUTPUT.value) / 'result.json'})")
  if _STEP.value is not None and Path(_WORKDIR.value).is_file() and not _TORCH_MODEL.value:
    raise ValueError(f"--step {_STEP.value} needs a training workdir, but {_WORKDIR.value} is a "
                     "params-only file holding one step; drop --step or pass the workdir")
  if _BATCH_SIZE.value < 1:
    raise ValueError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}; images per model call")
  if _NUM_EXAMPLES.value < 1:
    raise ValueError(f"--num_examples must be >= 1, got {_NUM_EXAMPLES.value}; the first N test "
                     "examples are evaluated")


def run() -> None:
  check_flags()
  if _ATTACK.value not in ANALYSES:  # Fail on bad flags before loading anything.
    try:
      evaluate.validate(_ATTACK.value, core.parse_eps_list(
          _EPS.value or DEFAULT_EPS.get(_NORM.value, "0")), _NORM.value)
    except ValueError as e:
      raise ValueError(f"{e} Or one of the analyses {ANALYSES}.") from e
  if _TORCH_MODEL.value:
    if _ATTACK.value in ANALYSES:
      raise ValueError(f"--torch_model supports the attacks, not the analyses {ANALYSES}.")
    workdir = Path(_TORCH_MODEL.value)
    config = ml_collections.ConfigDict({"data_source": "auto", "data_dir": ""})
    apply_fn, variables = torch_import.load_torch_model(workdir, _ARCH.value)
    return run_attacks(config, apply_fn, variables, workdir, None)
  workdir = Path(_WORKDIR.value)
  config = checkpoints.load_run_config(workdir)
  apply_fn, variables = checkpoints.load_model(workdir, step=_STEP.value)
  if _ATTACK.value == "checklist":
    run_checklist(config, apply_fn, variables, workdir)
  elif _ATTACK.value == "alignment":
    run_alignment(config, apply_fn, variables, workdir)
  elif _ATTACK.value == "mechanism":
    run_mechanism(config, apply_fn, variables, workdir)
  else:
    step = _STEP.value
    if step is None and workdir.is_dir():
      step = checkpoints.latest_step(workdir)
    run_attacks(config, apply_fn, variables, workdir, step)


def main(argv):
  del argv
  xla_flags.use_fast_cpu_convolutions()  # Before the first computation reads $XLA_FLAGS.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  run()  # Bad flags, run, data: one line and exit 2 (gfa_jax.cli).


if __name__ == "__main__":
  cli.run(main)

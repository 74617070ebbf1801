"""The main job of `make quickstart`: three short trainings and their evaluation, read out.

`python -m gfa_jax.quickstart` (from the repository root, where `configs/` lives) trains, on
the embedded CIFAR-10 subset, GFA-DEEP in the paper's setting (configs/quickstart.py), a
standard model (quickstart_standard.py) and GFA below the beta where the penalty acts
(quickstart_weak.py); attacks each with APGD-CE at Linf 8/255; and prints one table (clean
and robust accuracy, train alignment per layer, whether the model collapsed) with a few lines
read from those numbers. Exists so that a first run shows the project's finding
(docs/results.md: GFA either ignores its penalty or collapses) from numbers it measured itself.

Each run keeps its own workdir, `runs/<config name>/` as `python train.py --config ...` would
(so `runs/quickstart/` is eval.py's default), and resumes there: a second quickstart only
evaluates. `runs/quickstart/summary.json` and `runs/quickstart/quickstart.png` hold it all.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from gfa_jax import cli, data, evaluate, evaluators, reporting, train_lib, xla_flags

EPS, EPS_TEXT = 8 / 255, "8/255"
# An alignment this far above 0 is one the penalty moved: untrained and standard models sit
# within a few hundredths of 0 (docs/results.md).
ROSE = 0.1


@dataclasses.dataclass(frozen=True)
class Run:
  """One quickstart run: its name in the table, its config and where it trains."""
  name: str
  config: ml_collections.ConfigDict
  workdir: Path


def default_runs(root: str | Path = "runs") -> list[Run]:
  """The three runs of `make quickstart`, configs imported from the `configs` package (the
  repository root must be on sys.path, as it is for `python -m` from there)."""
  runs = []
  for name, module in (("GFA-DEEP (paper)", "quickstart"), ("standard", "quickstart_standard"),
                       ("GFA-DEEP (small beta)", "quickstart_weak")):
    try:
      config = importlib.import_module(f"configs.{module}").get_config()
    except ModuleNotFoundError as e:
      raise ImportError(f"cannot import configs.{module} ({e}); run the quickstart from the "
                        "repository root: python -m gfa_jax.quickstart") from None
    runs.append(Run(name, config, Path(root) / module))
  return runs


def _curves(workdir: Path) -> dict[str, list[float]]:
  """Test accuracy and mean train alignment at each evaluation of metrics.jsonl, by step."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in records if r["kind"] == "eval"}  # a resume logs a step again
  steps = sorted(evals)
  return {"step": steps, "test_accuracy": [evals[s]["test/accuracy"] for s in steps],
          "train_alignment": [_mean_alignment(evals[s]) for s in steps]}


def _alignment(record: dict) -> dict[str, float]:
  prefix = "train/alignment/"
  return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def _mean_alignment(record: dict) -> float | None:
  values = list(_alignment(record).values())
  return float(np.mean(values)) if values else None


def train_and_attack(run: Run, num_examples: int, batch_size: int = 500) -> dict:
  """Trains `run` (resuming its workdir) and attacks its final checkpoint with APGD-CE at Linf
  8/255 on the first `num_examples` test images; returns the run's summary record and writes
  the attack's JSON (eval.py's schema) to `<workdir>/eval/apgd_linf.json`."""
  final = train_lib.train_and_evaluate(run.config, run.workdir)
  model = evaluators.load_model(run.workdir)
  dataset = data.load_dataset(run.config.data_source, run.config.data_dir or None)
  request = evaluators.Request(eps=(EPS,), eps_text=EPS_TEXT, num_examples=num_examples,
                               batch_size=batch_size)
  result = evaluators.run_attacks(
      "apgd", model, lambda split, n: data.first_examples(dataset, split, n), request)
  result.report.update(checkpoint={"path": str(run.workdir), "step": final["step"]},
                       data=dataset.description, git_commit=evaluate.git_commit())
  attack_json = run.workdir / "eval" / "apgd_linf.json"
  result.write(attack_json)
  report = result.report
  return {
      "name": run.name, "workdir": str(run.workdir), "objective": run.config.objective,
      "beta": float(run.config.beta) if run.config.objective == "gfa" else None,
      "task_loss": run.config.task_loss, "steps": int(final["step"]),
      "data": dataset.description, "num_classes": dataset.num_classes, "attack": "APGD-CE",
      "norm": "linf", "eps": EPS, "eps_text": EPS_TEXT, "num_examples": report["num_examples"],
      "clean_accuracy": report["clean_accuracy"], "robust_accuracy": report["robust_accuracy"][0],
      "train_alignment": _alignment(final), "mean_train_alignment": _mean_alignment(final),
      "degenerate": report["degenerate"], "curves": _curves(run.workdir),
      "attack_json": str(attack_json)}


def _names(records: Sequence[dict]) -> str:
  return ", ".join(r["name"] for r in records) or "none"


def reading(records: Sequence[dict]) -> list[str]:
  """A few sentences read from the measured records: which runs collapsed, where the alignment
  rose, what robustness the others kept. Every number comes from `records`."""
  collapsed = [r for r in records if r["degenerate"]]
  others = [r for r in records if not r["degenerate"]]
  lines = []
  for r in collapsed:
    lines.append(f'{r["name"]} is degenerate: it {r["degenerate"].split(";")[0].split(": ", 1)[1]}.'
                 f' Its {reporting.pct(r["robust_accuracy"])} under APGD-CE is not robustness.')
  if not collapsed:
    lines.append("No model collapsed: each predicts many classes, above chance.")
  aligned = [r for r in records if (r["mean_train_alignment"] or 0.0) >= ROSE]
  means = ", ".join(f'{r["name"]} {r["mean_train_alignment"]:+.2f}' for r in records
                    if r["mean_train_alignment"] is not None)
  if aligned:
    collapsed_too = sum(bool(r["degenerate"]) for r in aligned)
    tail = ("" if not collapsed_too else ", which collapsed" if len(aligned) == 1
            else f", {collapsed_too} of which collapsed")
    lines.append(f"The mean train alignment ({means}) rose above {ROSE} only in "
                 f"{_names(aligned)}{tail}.")
  else:
    lines.append(f"The mean train alignment ({means}) stayed below {ROSE} everywhere: the "
                 "penalty did not move it.")
  learnt = [r for r in others if r["clean_accuracy"]]
  if learnt:
    # The share of correctly classified images the attack breaks: comparable between models
    # of different clean accuracy.
    broken = ", ".join(
        f'{r["name"]} {reporting.pct(1 - r["robust_accuracy"] / r["clean_accuracy"])}'
        for r in learnt)
    lines.append(f"Of the test images the models that did not collapse classify correctly, "
                 f"APGD-CE at Linf {EPS_TEXT} breaks {broken}.")
  lines.append("docs/results.md measures the same two regimes of GFA on all of CIFAR-10 "
               "(penalty ignored, or collapse), with every attack.")
  return lines


def run_quickstart(runs: Sequence[Run] | None = None, folder: str | Path = "runs/quickstart",
                   num_examples: int = 500) -> dict:
  """Trains and attacks every run (default: `default_runs()`), then writes
  `folder/summary.json` and `folder/quickstart.png` (reporting.write_quickstart); returns the
  summary record ({'runs': [...], 'reading': [...], 'files': {...}})."""
  records = [train_and_attack(r, num_examples) for r in runs or default_runs()]
  summary = {"runs": records, "reading": reading(records)}
  summary["files"] = reporting.write_quickstart(summary, Path(folder))
  return summary


def main(argv):
  del argv
  xla_flags.use_fast_cpu_convolutions()  # Before the first computation reads $XLA_FLAGS.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  summary = run_quickstart()
  print("\n".join(reporting.quickstart_lines(summary)))


if __name__ == "__main__":
  cli.run(main)  # Bad input (a run of another config in a workdir...): one line, exit 2.

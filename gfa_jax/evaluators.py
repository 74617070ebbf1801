"""Evaluators registered by name, one protocol for everything that evaluates a model.

In the spirit of big_vision's evaluators: each is a function
``run(model: Model, data: Data, request: Request) -> Result``, registered with `register`;
eval.py looks the name up (every attack of ``evaluate.ATTACKS`` and ``all`` map to the
``attacks`` evaluator) and hands the Result to gfa_jax.reporting. Evaluators compute; they
neither parse flags nor format files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gfa_jax import (analysis, batching, checklist, checkpoints, evaluate, objectives,
                     reporting, torch_import)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model to evaluate: ``apply_fn(variables, images in [0, 1]) -> logits``, its name in
  reports and plots, and the config it was trained with (task loss, data set)."""
  apply_fn: Callable
  variables: Any
  label: str
  config: Any = None


@dataclasses.dataclass(frozen=True)
class Request:
  """What to evaluate: the threat model, how many images, and the evaluator's own options."""
  norm: str = "linf"
  eps: tuple[float, ...] = (8 / 255,)
  eps_text: str = "8/255"
  num_examples: int = 1000
  batch_size: int = 500
  seed: int = 0
  subset: tuple[int, ...] | None = None  # attacks: robust accuracy also on these examples
  overrides: dict | None = None  # attacks: hyper-parameters replacing the defaults
  attack_constant_models: bool = False  # attacks: attack even an input-independent model
  budget: str = "default"  # checklist
  surrogate: Model | None = None  # checklist: the transfer attack's standard-trained model
  compare: Model | None = None  # mechanism: a second model measured beside the first


@dataclasses.dataclass
class Result:
  """An evaluator's output: the JSON-ready report, the terminal lines, and `write`, which
  puts the report's files under a path (a JSON file or a folder) and returns what it wrote."""
  report: dict
  lines: list[str]
  write: Callable[[Path], list[Path]]
  output_is_folder: bool = False


def load_model(path: str | Path, step: int | None = None, torch_arch: str | None = None) -> Model:
  """The Model of a training workdir or params-only .msgpack file (named after its run
  folder for results/<run>/params.msgpack), or with `torch_arch` of a PyTorch state_dict
  (gfa_jax.torch_import; its data set is found by `data.load_dataset`'s 'auto')."""
  path = Path(path)
  if torch_arch:
    config = ml_collections.ConfigDict({"data_source": "auto", "data_dir": ""})
    return Model(*torch_import.load_torch_model(path, torch_arch), path.stem, config)
  label = path.parent.name if path.suffix == ".msgpack" and path.stem == "params" else path.stem
  return Model(*checkpoints.load_model(path, step=step), label, checkpoints.load_run_config(path))


# Data: (split, number of examples) -> (images float32 [N, H, W, C] in [0, 1], labels [N]).
Data = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
EVALUATORS: dict[str, Callable[[Model, Data, Request], Result]] = {}


def register(name: str):
  """Decorator: registers ``run(model, data, request) -> Result`` under `name`."""
  def decorate(fn):
    if name in EVALUATORS:
      raise ValueError(f"evaluator {name!r} is registered twice")
    EVALUATORS[name] = fn
    return fn
  return decorate


def get(name: str) -> Callable[[Model, Data, Request], Result]:
  """The evaluator of `name`: an analysis, or for an attack name (and `all`) the attacks
  evaluator bound to it."""
  if name in EVALUATORS:
    return EVALUATORS[name]
  if name in evaluate.attack_names():
    return functools.partial(run_attacks, name)
  raise ValueError(f'unknown evaluation {name!r}: choose an attack ({", ".join(evaluate.attack_names())}) '
                   f'or an analysis ({", ".join(analyses())})')


def analyses() -> list[str]:
  """The registered evaluators that are not attacks."""
  return list(EVALUATORS)


def run_attacks(attack: str, model: Model, data: Data, request: Request) -> Result:
  """One attack of evaluate.ATTACKS (or `all`) over the first test images, every example
  checked against its budget (evaluate.evaluate); the Result's JSON is docs/evaluation.md's."""
  images, labels = data("test", request.num_examples)
  report = evaluate.evaluate(
      batching.bind(model.apply_fn, model.variables), images, labels, attack=attack,
      eps=list(request.eps), norm=request.norm, batch_size=request.batch_size,
      seed=request.seed, subset=request.subset, overrides=request.overrides,
      skip_if_constant=not request.attack_constant_models)
  report["eps_text"] = request.eps_text

  def write(path: Path) -> list[Path]:
    return [reporting.write_json(path, report)]

  return Result(report, reporting.attack_summary(report).splitlines(), write)


@register("checklist")
def _checklist(model: Model, data: Data, request: Request) -> Result:
  """The eight gradient-masking checks (docs/checklist.md) at one eps."""
  if len(request.eps) != 1:
    raise ValueError(f"--attack checklist takes one --eps (it sweeps eps itself), got "
                     f"{list(request.eps)}.")
  images, labels = data("test", request.num_examples)
  surrogate = request.surrogate
  report = checklist.run_checklist(
      model.apply_fn, model.variables, images, labels, key=jax.random.key(request.seed),
      eps=request.eps[0], norm=request.norm, out_dir=None,
      surrogate=surrogate and (surrogate.apply_fn, surrogate.variables),
      budget=request.budget, batch_size=request.batch_size, progress=True)

  def write(folder: Path) -> list[Path]:
    return [folder / name for name in reporting.write_checklist(report, folder).values()]

  lines = [f"{c['id']}. {c['name']}: {c['status']} - {c['verdict']}" for c in report["checks"]]
  return Result(report, lines, write, output_is_folder=True)


@register("alignment")
def _alignment(model: Model, data: Data, request: Request) -> Result:
  """Per-layer train/test GFA alignment cos(dL/dh, h) with the run's task loss (Table 1)."""
  splits = {split: data(split, request.num_examples) for split in ("train", "test")}
  table = analysis.alignment_table(model.apply_fn, model.variables, splits,
                                   objectives.make_task_loss(model.config),
                                   batch_size=request.batch_size)
  report = {"alignment": table, "num_examples": request.num_examples,
            "task_loss": model.config.task_loss}

  def write(path: Path) -> list[Path]:
    return [reporting.write_json(path, report, indent=2)]

  return Result(report, reporting.alignment_markdown(table).splitlines(), write)


@register("mechanism")
def _mechanism(model: Model, data: Data, request: Request) -> Result:
  """Radial vs tangential numbers and loss landscapes (docs/checklist.md), for the model and
  the optional comparison model, drawn side by side."""
  images, labels = data("test", request.num_examples)
  models = [model] + ([request.compare] if request.compare else [])
  if request.compare and request.compare.label == model.label:
    raise ValueError(f"--compare has the same name as --workdir ({model.label}); rename one "
                     "of them.")
  per_model = {}
  for m in models:
    per_model[m.label] = {
        "radial_tangential": analysis.radial_tangential(
            m.apply_fn, m.variables, images, labels, batch_size=request.batch_size),
        # Landscapes cost num**2 forward passes per image and plane: the first 64 images.
        "landscape": analysis.loss_landscape(
            m.apply_fn, m.variables, images[:64], labels[:64],
            key=jax.random.key(request.seed)),
    }
  report = {"models": per_model}
  lines = [f"{label} {layer}: cos(g, h) {numbers['cosine']['mean']:+.3f}, median d_t/|d_r| "
           f"{numbers['tangential_over_radial']['median']:.3g}"
           for label, r in per_model.items()
           for layer, numbers in r["radial_tangential"]["layers"].items()]

  def write(folder: Path) -> list[Path]:
    return reporting.write_mechanism(report, folder)

  return Result(report, lines, write, output_is_folder=True)

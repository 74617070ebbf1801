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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gfa_jax import (adapters, analysis, checklist, checkpoints, evaluate, objectives,
                     reporting, torch_import)
from gfa_jax.adapters import Model


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
  progress: bool = True  # attacks, checklist: progress bars on the terminal
  resume_dir: str | None = None  # attacks: progress folder, resumable (gfa_jax.eval_units)


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
    # Through as_model: two checkpoints of one arch then share every compiled attack.
    model = adapters.as_model(torch_import.load_torch_model(path, torch_arch), label=path.stem)
    return dataclasses.replace(model, config=config)
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


def robustness(model: Any, images, labels, *, attack: str = "autoattack",
               eps: float | Sequence[float] = 8 / 255, norm: str = "linf", **options) -> dict:
  """Evaluates any model (whatever `adapters.as_model` accepts) on the given images and labels,
  the library's one entry point, through the evaluator eval.py runs for `attack`.

  Args:
    model: a logits function, an NNX module, a Linen (apply_fn, variables) pair, or a Model.
    images, labels: test images [N, H, W, C] in [0, 1] and int labels [N], all of them used.
    attack: an attack of ``evaluate.ATTACKS`` (default AutoAttack), ``all``, or ``checklist``
      or ``mechanism`` (the analyses of docs/checklist.md; they need one eps).
    eps: one radius in `norm` or a sequence of them.
    **options: `Request` fields: batch_size, seed, subset, overrides, attack_constant_models,
      budget, surrogate / compare (models, converted by as_model), progress.

  Returns the evaluator's report: for an attack the per-example result dict of
  `evaluate.evaluate` (docs/evaluation.md's schema, plus ``eps_text``), for the checklist
  checklist.json's dict.
  """
  fixed = {"norm", "eps", "eps_text", "num_examples"}
  allowed = sorted({f.name for f in dataclasses.fields(Request)} - fixed)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"robustness got unknown options {unknown}; it takes {allowed}.")
  for name in ("surrogate", "compare"):
    if options.get(name) is not None:
      options[name] = adapters.as_model(options[name])
  eps = (float(eps),) if np.ndim(eps) == 0 else tuple(float(e) for e in eps)
  x, y = np.asarray(images), np.asarray(labels)

  def data(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if split != "test":
      raise ValueError(f"{attack!r} needs {split!r} images too; robustness takes test images "
                       f"only: call evaluators.get({attack!r})(model, data, Request(...)) with a "
                       "data function that serves both splits.")
    return x[:n], y[:n]

  request = Request(norm=norm, eps=eps, eps_text=", ".join(f"{e:.6g}" for e in eps),
                    num_examples=len(x), **options)
  return get(attack)(adapters.as_model(model), data, request).report


def run_attacks(attack: str, model: Model, data: Data, request: Request) -> Result:
  """One attack of evaluate.ATTACKS (or `all`) over the first test images, every example
  checked against its budget (evaluate.evaluate); the Result's JSON is docs/evaluation.md's."""
  images, labels = data("test", request.num_examples)
  report = evaluate.evaluate(
      model.logits_fn, images, labels, attack=attack, eps=list(request.eps), norm=request.norm,
      batch_size=request.batch_size, seed=request.seed, subset=request.subset,
      overrides=request.overrides, progress=request.progress,
      skip_if_constant=not request.attack_constant_models, resume_dir=request.resume_dir)
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
      budget=request.budget, batch_size=request.batch_size, progress=request.progress)

  def write(folder: Path) -> list[Path]:
    return [folder / name for name in reporting.write_checklist(report, folder).values()]

  lines = [f"{c['id']}. {c['name']}: {c['status']} - {c['verdict']}" for c in report["checks"]]
  return Result(report, lines, write, output_is_folder=True)


@register("alignment")
def _alignment(model: Model, data: Data, request: Request) -> Result:
  """Per-layer train/test GFA alignment cos(dL/dh, h) with the run's task loss (Table 1)."""
  if not isinstance(getattr(model.config, "task_loss", None), str):
    raise ValueError(f"alignment needs the task loss {model.label} was trained with: give its "
                     "Model a config, e.g. dataclasses.replace(model, config=ml_collections."
                     "ConfigDict({'task_loss': 'ce'})).")
  adapters.check_linen_taps(model, "alignment")
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
  for m in models:
    adapters.check_linen_taps(m, "mechanism")
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

"""Robustness evaluation: named attacks over N examples, with numbers recomputed, not trusted.

`evaluate(logits_fn, images, labels, attack=..., eps=[...], norm=...)` returns a JSON-ready dict
(schema in docs/evaluation.md). What makes the numbers honest:

- every returned example is checked on the host to lie within eps in the stated norm and in
  [0, 1] (`core.check_adversarial`); a violation raises instead of being reported;
- robust accuracy comes from a final clean forward pass of the returned examples, never from an
  attack's own bookkeeping, over ALL N examples: a point is robust at eps iff both the clean image
  and its adversarial example are classified correctly (misclassified clean points never count);
- minimum-norm attacks (deepfool, cw, ead, fab) run once; at each eps the point is attacked with
  x_adv if ||x_adv - x|| <= eps, else with x itself, and that image goes through the forward pass;
- attacks run in batches of `batch_size` images per model call (memory bound), each attack
  compiled once per batch shape (the last batch is padded, eps is a traced argument).
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm

from gfa_jax import batching, eval_units
from gfa_jax.model_checks import degenerate_model, input_independence
from gfa_jax.numerics import check_batch, check_labels, check_logits
from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd, apgd_t
from gfa_jax.attacks.autoattack import autoattack, check_range_output
from gfa_jax.attacks.cw import cw_l2
from gfa_jax.attacks.deepfool import deepfool
from gfa_jax.attacks.ead import ead
from gfa_jax.attacks.fab import fab
from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.attacks.onepixel import onepixel
from gfa_jax.attacks.pgd import pgd
from gfa_jax.attacks.square import square

SCHEMA_VERSION = 1
# Kinds of attack, by how robust accuracy at an eps is obtained from their output.
EPS_BOUNDED = "eps_bounded"  # run once per eps; returns points within eps
MIN_NORM = "min_norm"  # run once; smallest adversarial example found, thresholded per eps
L0 = "l0"  # pixel budget instead of eps (OnePixel): masks [1, N] at its budget, whatever eps
ENSEMBLE = "ensemble"  # AutoAttack: host-side sequence, per-point worst case
LP_NORMS = ("linf", "l2", "l1")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """How evaluation runs one named attack.

  fn: the attack function; kind: one of the kinds above; norms: threat-model norms it supports;
  hparams: overrides of fn's own keyword defaults (evaluation settings that differ from the
  function's defaults, e.g. PGD-20); source: where the defaults come from.
  """
  fn: Callable
  kind: str
  norms: tuple[str, ...]
  hparams: tuple[tuple[str, Any], ...] = ()
  source: str = ""


_AA = "AutoAttack (Croce & Hein 2020, fra31/auto-attack)"
ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(fgsm, EPS_BOUNDED, ("linf", "l2"), (),
                       "Goodfellow et al. 2015; l2: fast gradient method"),
    "pgd": AttackSpec(pgd, EPS_BOUNDED, ("linf", "l2"), (("steps", 20),),
                      "Madry et al. 2018: random start, step 2.5*eps/steps, best iterate; 20 "
                      "steps (PGD-20)"),
    "apgd": AttackSpec(apgd, EPS_BOUNDED, ("linf", "l2"), (("loss", "ce"),), f"APGD-CE, {_AA}"),
    "apgd-dlr": AttackSpec(apgd, EPS_BOUNDED, ("linf", "l2"), (("loss", "dlr"),),
                           f"APGD-DLR, {_AA}"),
    "apgd-t": AttackSpec(apgd_t, EPS_BOUNDED, ("linf", "l2"), (), f"APGD-T, {_AA}"),
    "fab": AttackSpec(fab, MIN_NORM, ("linf", "l2"), (("targeted", True),),
                      f"FAB-T (Croce & Hein 2020), defaults of {_AA}"),
    "square": AttackSpec(square, EPS_BOUNDED, ("linf", "l2"), (("rescale_schedule", False),),
                         f"Andriushchenko et al. 2020, as run by {_AA}"),
    "autoattack": AttackSpec(autoattack, ENSEMBLE, ("linf", "l2"), (("version", "standard"),),
                             f"{_AA}; version standard unless --aa_version says otherwise"),
    "deepfool": AttackSpec(deepfool, MIN_NORM, ("linf", "l2"), (),
                           "Moosavi-Dezfooli et al. 2016, defaults of foolbox 3"),
    "cw": AttackSpec(cw_l2, MIN_NORM, ("l2",), (),
                     "Carlini & Wagner 2017 (L2), defaults of the authors' code"),
    "ead": AttackSpec(ead, MIN_NORM, ("l1", "l2"), (("decision_rule", "EN"),),
                      "Chen et al. 2018 (EAD, elastic-net decision rule)"),
    "ead-l1": AttackSpec(ead, MIN_NORM, ("l1", "l2"), (("decision_rule", "L1"),),
                         "Chen et al. 2018 (EAD, L1 decision rule)"),
    "onepixel": AttackSpec(onepixel, L0, LP_NORMS, (),
                           "Su et al. 2019: differential evolution, population 400, 100 "
                           "iterations, F = 0.5"),
}
ALL = "all"
# Arguments that are inputs or bookkeeping, not hyper-parameters of the attack.
_NOT_HPARAMS = ("key", "eps", "norm", "return_trace", "batch_size", "progress", "first_target",
                "skip_if_constant")  # evaluate decides it (its own skip_if_constant)


def attack_names() -> list[str]:
  return [*ATTACKS, ALL]


def hyperparameters(name: str, norm: str, overrides: dict | None = None) -> dict[str, Any]:
  """Every keyword argument the named attack is called with besides key, eps and norm: its
  function's defaults, then the registry's evaluation settings, then `overrides`."""
  spec = ATTACKS[name]
  params = inspect.signature(spec.fn).parameters
  used = {p.name: p.default for p in params.values()
          if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in _NOT_HPARAMS}
  used.update(spec.hparams)
  for key, value in (overrides or {}).items():
    if key not in params or key in _NOT_HPARAMS:
      raise ValueError(f"{name} has no hyper-parameter {key!r}; it takes {sorted(used)}.")
    used[key] = value
  return used


def _takes_norm(fn: Callable) -> bool:
  return "norm" in inspect.signature(fn).parameters


def validate(attack: str, eps: Sequence[float], norm: str) -> list[str]:
  """Checks the request before any work; returns the attack names it will run.

  Raises ValueError for an unknown attack, a norm the attack does not support, or eps out of
  range (< 0, or > 1 in linf).
  """
  if attack not in attack_names():
    raise ValueError(f"Unknown attack {attack!r}: choose one of {attack_names()}.")
  if norm not in LP_NORMS:
    raise ValueError(f"Unknown norm {norm!r}: choose one of {list(LP_NORMS)}.")
  if attack != ALL and norm not in ATTACKS[attack].norms:
    raise ValueError(f"{attack} does not support norm {norm!r}: it supports "
                     f"{list(ATTACKS[attack].norms)}. Pass --norm with one of those.")
  if np.ndim(eps) == 0:
    raise ValueError(f"eps must be a list of radii (one robust accuracy each), got {eps!r:.80}; "
                     f"pass eps=[{eps!r:.40}]")
  eps = list(eps)
  if not eps:
    raise ValueError("eps list is empty: give at least one eps (e.g. 8/255).")
  for value in eps:
    core.check_eps(value, norm, allowed_norms=(norm,))
  if attack == ALL:
    return [name for name, spec in ATTACKS.items() if norm in spec.norms]
  return [attack]


def onepixel_batching(population: int, batch_size: int, chunk_size: int | None = None,
                      ) -> tuple[int, int]:
  """(examples per batch, chunk_size) so that one OnePixel model call sees about batch_size images.

  By default a call evaluates whole populations: batch_size // population examples per batch (at
  least one, whose population is then split into the largest chunk that divides it and fits).
  Batches stay small, which matters because a batch searches until all its examples are fooled.
  """
  if chunk_size is None:
    fitting = [c for c in range(1, population + 1) if population % c == 0 and c <= batch_size]
    chunk_size = max(fitting or [1])
  return max(1, batch_size // chunk_size), chunk_size


def _check_subset(subset, n: int) -> np.ndarray | None:
  if subset is None:
    return None
  subset = np.asarray(subset)
  if subset.ndim != 1 or not np.issubdtype(subset.dtype, np.integer):
    raise ValueError(f"subset must be a 1-D list of integer example indices, got {subset!r:.80}.")
  if len(np.unique(subset)) != len(subset):
    raise ValueError("subset indices must be unique.")
  if len(subset) and (subset.min() < 0 or subset.max() >= n):
    raise ValueError(f"subset indices must lie in [0, {n}) (the {n} evaluated examples), got "
                     f"[{subset.min()}, {subset.max()}]. Raise --num_examples or fix the file.")
  return subset


def _norm_stats(values: np.ndarray) -> dict[str, float | None]:
  if not len(values):
    return {"median": None, "mean": None}
  return {"median": float(np.median(values)), "mean": float(np.mean(values))}


def checked_robust_mask(logits_fn: Callable, x_adv: np.ndarray, x: np.ndarray, y: np.ndarray,
                        clean_correct: np.ndarray, eps: float, norm: str,
                        batch_size: int) -> np.ndarray:
  """[N] mask: correct clean and still correct at x_adv, after checking that every x_adv[i]
  lies within eps of x[i] in `norm` and inside [0, 1] (a violation raises). The one place
  robust accuracy is decided, for evaluate and the checklist's own runs alike."""
  core.check_adversarial(x_adv, x, eps, norm)
  return clean_correct & (batching.predict(logits_fn, x_adv, batch_size) == y)


def _attack_key(seed: int, name: str) -> jax.Array:
  """Key of one attack, independent of which other attacks run (so `all` repeats single runs)."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def run_attack(name: str, logits_fn: Callable, x: np.ndarray, y: np.ndarray, *,
               eps: Sequence[float], norm: str, clean_correct: np.ndarray, batch_size: int,
               seed: int, overrides: dict | None = None, progress: bool = True,
               not_run: str | None = None) -> dict:
  """Runs one named attack over all of x and returns its result section (see the schema).

  `still_robust[i][j]` is True iff example j is classified correctly both clean and after the
  attack at eps[i], from forward passes of the checked adversarial examples. With `not_run`
  (why: the model's logits do not depend on its input) the attack is not called: every
  x_adv is x, the masks come from the same forward passes, and the section says `not_run`.
  AutoAttack decides that itself (its stages are then `skipped_stages`).
  """
  spec = ATTACKS[name]
  hparams = hyperparameters(name, norm, overrides)
  call_hparams = tuple(hparams.items())
  if _takes_norm(spec.fn) and spec.kind != ENSEMBLE:
    call_hparams = (("norm", norm),) + call_hparams
  key = _attack_key(seed, name)
  start = time.perf_counter()
  result: dict[str, Any] = {"kind": spec.kind, "source": spec.source,
                            "function": f"{spec.fn.__module__}.{spec.fn.__name__}",
                            "hyperparameters": hparams}
  # Points misclassified clean are not robust whatever the attack does: attack only the others
  # (as AutoAttack does); their x_adv is x.
  todo = np.flatnonzero(clean_correct)

  if not_run and spec.kind != ENSEMBLE:
    result["not_run"] = not_run
    todo = todo[:0]

  def attack_correct(bar, eps_value=None, examples_per_batch=batch_size):
    x_adv = x.copy()
    if len(todo):
      # APGD-T and FAB-T (with eps) attack each target on the points no earlier target
      # fooled, inside one compiled call (their `compact` default), as the reference loops.
      x_adv[todo] = core.run_in_batches(spec.fn, logits_fn, x[todo], y[todo], key=key,
                                        batch_size=examples_per_batch, eps=eps_value,
                                        hparams=call_hparams,
                        progress=bar)
    return x_adv

  def num_batches(examples_per_batch=batch_size):
    return -(-len(todo) // max(1, min(examples_per_batch, len(todo))))

  def still_robust(x_eval, value, threat=norm):
    return checked_robust_mask(logits_fn, x_eval, x, y, clean_correct, value, threat, batch_size)

  if spec.kind == EPS_BOUNDED:
    masks = []
    with tqdm.tqdm(total=num_batches() * len(eps), desc=name, disable=not progress) as bar:
      for i, value in enumerate(eps):
        with eval_units.scope(f"eps{i}"):
          masks.append(still_robust(attack_correct(bar, value), value))
  elif spec.kind == ENSEMBLE:  # AutoAttack skips misclassified points itself
    masks, broken_by, after, checks, stage_seconds, compile_seconds, skipped = (
        [] for _ in range(7))
    for i, value in enumerate(tqdm.tqdm(eps, desc=name, disable=not progress)):
      with eval_units.scope(f"eps{i}"):
        x_adv, breakdown = spec.fn(logits_fn, x, y, key=key, eps=value, norm=norm,
                                   batch_size=batch_size, progress=progress,
                                   skip_if_constant=not_run is not None, **hparams)
      masks.append(still_robust(x_adv, value))
      broken_by.append(breakdown["broken_by"])
      after.append(breakdown["robust_accuracy_after"])
      checks.append(breakdown["checks"])
      stage_seconds.append(breakdown["seconds"])
      compile_seconds.append(breakdown["compile_seconds"])
      skipped.append(breakdown["skipped"])
    result["hyperparameters"] = {**hparams, "attacks": breakdown["hyperparameters"]}
    result["label"] = breakdown["label"]
    result["broken_by"] = broken_by
    result["robust_accuracy_after"] = after
    result["checks"] = checks  # per eps: the reference's automatic checks (docs/checklist.md)
    result["stage_seconds"] = stage_seconds  # per eps: {checks, each attack: wall seconds}
    result["stage_compile_seconds"] = compile_seconds  # per eps: the compiling part of those
    result["skipped_stages"] = skipped  # per eps: {attack: why not run} (input-independent model)
  elif spec.kind == MIN_NORM:
    with tqdm.tqdm(total=num_batches(), desc=name, disable=not progress) as bar:
      x_adv = attack_correct(bar)
    norms = {p: core.check_adversarial(x_adv, x, np.inf, p) for p in LP_NORMS}
    success = clean_correct & (batching.predict(logits_fn, x_adv, batch_size) != y)
    needed = np.where(success, norms[norm], np.inf)
    masks = []
    for value in eps:
      x_eval = np.where((needed <= value)[:, None, None, None], x_adv, x)
      masks.append(still_robust(x_eval, value))
    result["success_rate"] = float(success.sum() / max(clean_correct.sum(), 1))
    result["norms"] = {p: _norm_stats(norms[p][success]) for p in LP_NORMS}
    result["perturbation_norm"] = [float(v) if np.isfinite(v) else None for v in needed]
  else:  # L0: OnePixel's pixel budget
    per_batch, chunk = onepixel_batching(hparams["population"], batch_size, hparams["chunk_size"])
    call_hparams = tuple((k, chunk if k == "chunk_size" else v) for k, v in call_hparams)
    with tqdm.tqdm(total=num_batches(per_batch), desc=name, disable=not progress) as bar:
      x_adv = attack_correct(bar, examples_per_batch=per_batch)
    changed = np.any(x_adv != x, axis=-1).reshape(len(x), -1).sum(axis=1)
    if np.any(changed > hparams["pixels"]):
      raise ValueError(f'{int((changed > hparams["pixels"]).sum())} OnePixel examples change '
                       f'more than pixels={hparams["pixels"]} pixels (up to {changed.max()}).')
    mask = still_robust(x_adv, 1.0, "linf")  # an L0 budget: only the [0, 1] box to check
    masks = [mask]  # one "eps": the pixel budget
    result["threat_model"] = {"norm": "l0", "pixels": hparams["pixels"]}
    result["success_rate"] = float((clean_correct & ~mask).sum() / max(clean_correct.sum(), 1))
    result["perturbation_norm"] = [int(c) if f else None for c, f in zip(changed, ~mask & clean_correct)]
  # One result type for every kind: masks [n_eps, N] (OnePixel: [1, N], its pixel budget).
  result["robust_accuracy"] = [float(m.mean()) for m in masks]
  result["still_robust"] = [m.tolist() for m in masks]
  result["elapsed_seconds"] = time.perf_counter() - start
  return result


def evaluate(logits_fn: Callable[[jax.Array], jax.Array], images, labels, *, attack: str,
             eps: Sequence[float], norm: str = "linf", batch_size: int = 500, seed: int = 0,
             subset: Sequence[int] | None = None, overrides: dict | None = None,
             progress: bool = True, skip_if_constant: bool = True,
             resume_dir: str | Path | None = None) -> dict:
  """Evaluates `attack` ('all' for every attack supporting `norm`) on images [N, H, W, C] in
  [0, 1] with int labels [N]; returns the JSON-ready result dict (docs/evaluation.md).

  Args:
    logits_fn: images in [0, 1] -> logits (inference mode, pure).
    eps: radii in `norm`, one robust accuracy per entry.
    batch_size: images per model call (per example batch for all but OnePixel).
    seed: PRNG seed; each attack's key depends only on the seed and the attack's name.
    subset: optional example indices into the N (the paper's protocol); robust accuracy on them
      is reported in separate `subset` fields, never instead of the full-N numbers.
    overrides: hyper-parameters replacing the defaults (single attack only).
    skip_if_constant: when the model's logits do not depend on its input
      (`input_independence`, recorded under `model_checks`), the attacks are not run: each
      attack's section says `not_run` and its robust accuracy is the clean accuracy, which is
      what any attack would leave. False attacks anyway.
    resume_dir: a progress folder (`eval_units`): each finished attack batch is stored there,
      and a rerun of the same request loads them instead of computing them again (the result
      is the uninterrupted run's); several processes on it split the batches. A different
      request on the folder raises ValueError. The caller deletes it when done.
  """
  start = time.perf_counter()
  names = validate(attack, eps, norm)
  if overrides and attack == ALL:
    raise ValueError('overrides apply to a single attack, not to "all".')
  x, y = check_batch(images, labels)
  if not len(x):
    raise ValueError("no examples to evaluate (0 images); pass at least one image and label")
  subset = _check_subset(subset, len(x))
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r:.40}.")
  first = np.asarray(jax.jit(logits_fn)(x[:batch_size]))
  # The number of classes is known from here on: labels beyond it would be scored as wrong.
  check_logits(first, len(first))
  check_labels(y, first.shape[-1], len(x))
  # Probabilities instead of logits: attacks meet vanishing gradients (AutoAttack's check).
  range_check = check_range_output(first)
  if not np.isfinite(first).all():
    # argmax of NaN logits is class 0: a NaN model would be scored like a constant classifier.
    raise ValueError(f"the model outputs non-finite logits on {int((~np.isfinite(first)).any(-1).sum())}"
                     f" of the first {len(first)} clean images; it is broken (diverged "
                     "training?) — evaluate an earlier checkpoint (--step) or retrain")
  # With resume_dir every attack batch is a unit stored there as it finishes (eval_units); a
  # folder of another request is refused before any attack, a bad model or input before it is made.
  store = eval_units.UnitStore(resume_dir, {
      "schema_version": SCHEMA_VERSION, "model": eval_units.model_fingerprint(logits_fn),
      "data": eval_units.fingerprint(x, y), "attack": attack, "eps": [float(e) for e in eps],
      "norm": norm, "num_examples": len(x), "batch_size": batch_size, "seed": int(seed),
      "overrides": overrides, "skip_if_constant": skip_if_constant}) if resume_dir else None
  predictions = batching.predict(logits_fn, x, batch_size)
  clean_correct = predictions == y
  degenerate = degenerate_model(predictions, y, num_classes=first.shape[-1])

  model_checks = input_independence(logits_fn, x, y, clean_correct, eps=list(eps), norm=norm,
                                    batch_size=batch_size, key=_attack_key(seed, "input_independent"))
  model_checks += [range_check] if range_check["status"] == "warn" else []
  constant = any(c["check"] == "input_independent" and c["status"] == "warn"
                 for c in model_checks)
  not_run = ("the model's logits do not depend on the input (model_checks)"
             if constant and skip_if_constant else None)
  results, skipped = {}, {}
  if attack == ALL:
    skipped = {n: f"does not support norm {norm!r}" for n in ATTACKS if n not in names}
  with eval_units.recording(store):
    for name in names:
      with eval_units.scope(name):
        results[name] = run_attack(name, logits_fn, x, y, eps=list(eps), norm=norm,
                                   clean_correct=clean_correct, batch_size=batch_size,
                                   seed=seed, overrides=overrides, progress=progress,
                                   not_run=not_run)

  # The headline: the attack's masks, or with 'all' the per-point worst case over every attack
  # with an eps threat model (OnePixel's pixel budget is another threat model).
  eps_results = [r for r in results.values() if r["kind"] != L0]
  if eps_results:
    worst = np.logical_and.reduce([np.asarray(r["still_robust"]) for r in eps_results])
    robust_accuracy = worst.mean(axis=1).tolist()
  else:  # a single OnePixel run: its pixel budget is the one threat model
    worst = np.asarray(results[names[0]]["still_robust"])
    robust_accuracy = results[names[0]]["robust_accuracy"]

  report = {
      "schema_version": SCHEMA_VERSION,
      "attack": attack,
      "norm": norm,
      "eps": [float(e) for e in eps],
      "num_examples": int(len(x)),
      "batch_size": int(batch_size),
      "seed": int(seed),
      "clean_accuracy": float(clean_correct.mean()),
      "robust_accuracy": robust_accuracy,
      "clean_correct": clean_correct.tolist(),
      "still_robust": worst.tolist(),
      "attacks": results,
      "skipped": skipped,
      "model_checks": model_checks,
      "subset": None,
      "degenerate": degenerate,
  }
  if subset is not None:
    for r in results.values():
      masks = np.asarray(r["still_robust"])
      r["subset_robust_accuracy"] = _subset_mean(masks, subset)
    report["subset"] = {"indices": subset.tolist(), "num_examples": int(len(subset)),
                        "clean_accuracy": _subset_mean(clean_correct, subset),
                        "robust_accuracy": _subset_mean(worst, subset)}
  report["elapsed_seconds"] = time.perf_counter() - start
  return report


def _subset_mean(masks: np.ndarray, subset: np.ndarray):
  """Mean over the subset's examples (last axis); a float for one mask, a list for several."""
  if not len(subset):
    return None if masks.ndim == 1 else [None] * len(masks)
  values = masks[..., subset].mean(axis=-1)
  return float(values) if masks.ndim == 1 else values.tolist()


def git_commit(path: str | Path = Path(__file__).parent) -> str | None:
  """The commit of the repository holding `path`, with '-dirty' if it has uncommitted changes;
  None outside a git checkout."""
  def git(*args):
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
  except (OSError, subprocess.SubprocessError):
    return None
  try:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    dirty = False
  return commit + ("-dirty" if dirty else "")

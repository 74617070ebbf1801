"""`run_checklist`: the eight checks as a pipeline over memoised producers.

Each step of `STEPS` names a phase and grades one or two checks from what `Runs` measures;
`Runs` runs each attack once, when the first check asks for it, so a check never depends on
which checks ran before it, and the report's per-phase seconds show where the time went.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax import batching, numerics, reporting
from gfa_jax.attacks import core
from gfa_jax.attacks.pgd import pgd
from gfa_jax.checklist import grading, producers
from gfa_jax.checklist.grading import FAIL, PASS, WARN
from gfa_jax.checklist.producers import BUDGETS, Budget, Setup


class Runs:
  """Every measurement of the checklist, each computed once (functools.cached_property)."""

  def __init__(self, model: tuple[Callable, Any], setup: Setup, budget: Budget, key: jax.Array,
               surrogate: tuple[Callable, Any] | None):
    self.model, self.setup, self.budget, self.key = model, setup, budget, key
    self.surrogate = surrogate
    self._apgd: dict[tuple, Any] = {}
    self._apgd_key = jax.random.fold_in(key, 100)

  def apgd_ce(self, steps: int, eps: float | None = None, run: int = 0):
    """APGD-CE (mask, trace): run 0 of an iteration count at an eps is shared by the sweep,
    the convergence check and the restarts; runs r > 0 are the extra restarts."""
    eps = self.setup.eps if eps is None else eps
    if (steps, eps, run) not in self._apgd:
      self._apgd[steps, eps, run] = producers.apgd_ce_run(
          self.setup, steps, jax.random.fold_in(self._apgd_key, run), eps)
    return self._apgd[steps, eps, run]

  @functools.cached_property
  def sweep(self) -> tuple[list[float], dict[str, np.ndarray]]:
    """Checks 1 and 2: FGSM, PGD and APGD-CE masks [len(sweep), N] over the eps sweep."""
    s, b = self.setup, self.budget
    values = producers.eps_sweep(s.eps, s.norm, s.x.shape[1:])
    masks = {
        "fgsm": producers.registry_masks(s, "fgsm", values),
        f"pgd-{b.sweep_pgd_steps}": producers.registry_masks(
            s, "pgd", values, {"steps": b.sweep_pgd_steps}),
        f"apgd-ce-{b.sweep_apgd_steps}": np.stack([
            self.apgd_ce(b.sweep_apgd_steps, e)[0] for e in values])}
    return values, masks

  @functools.cached_property
  def grey_bound(self) -> float:
    """Share of points a classifier keeps when every image is replaced by mid-grey."""
    s = self.setup
    grey = np.full((1, *s.x.shape[1:]), 0.5, np.float32)
    grey_class = int(batching.predict(s.logits_fn, grey, 1)[0])
    return float((s.clean_correct & (s.y == grey_class)).mean())

  @functools.cached_property
  def convergence(self):
    """Check 4: masks at growing iteration counts, the restarts' mask, the loss traces."""
    b = self.budget
    masks, traces = [], {}
    for steps in b.convergence_steps:
      mask, trace = self.apgd_ce(steps)
      masks.append(mask)
      traces[f"{steps} iterations"] = trace
    runs = [self.apgd_ce(b.restart_steps, run=r) for r in range(b.restarts)]
    restart_mask = np.logical_and.reduce([m for m, _ in runs])
    traces[f"{b.restarts} restarts x {b.restart_steps}"] = np.max([t for _, t in runs], axis=0)
    return masks, restart_mask, traces

  @functools.cached_property
  def losses(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Check 5: APGD with the DLR, targeted DLR and margin losses at eps; skipped ones."""
    s, b, k = self.setup, self.budget, self.setup.num_classes
    others, skipped = {}, {}
    if k >= 3:
      others["dlr"] = producers.registry_masks(s, "apgd-dlr", [s.eps], {"steps": b.loss_steps})[0]
    else:
      skipped["dlr"] = f"needs >= 3 classes, the model has {k}"
    if k >= 4:
      targets = min(b.targets, k - 1)
      others[f"targeted-dlr ({targets} targets)"] = producers.registry_masks(
          s, "apgd-t", [s.eps], {"steps": b.loss_steps, "num_targets": targets})[0]
    else:
      skipped["targeted-dlr"] = f"needs >= 4 classes, the model has {k}"
    others["margin"] = producers.registry_masks(s, "apgd", [s.eps], {"steps": b.loss_steps,
                                                                     "loss": "margin"})[0]
    return others, skipped

  @functools.cached_property
  def whitebox_runs(self) -> dict[str, np.ndarray]:
    """Every gradient attack's still-robust mask [N] at eps, by run name."""
    b = self.budget
    values, masks = self.sweep
    index = int(np.argmin(np.abs(np.asarray(values) - self.setup.eps)))
    runs = {name: m[index] for name, m in masks.items()}
    convergence, restart_mask, _ = self.convergence
    runs.update({f"apgd-ce-{s}": m for s, m in zip(b.convergence_steps, convergence)})
    runs[f"apgd-ce-{b.restart_steps}x{b.restarts}"] = restart_mask
    runs.update({f"apgd-{name.split()[0]}": m for name, m in self.losses[0].items()})
    return runs

  @functools.cached_property
  def whitebox(self) -> np.ndarray:
    return np.logical_and.reduce(list(self.whitebox_runs.values()))

  @functools.cached_property
  def black_box(self) -> dict[str, np.ndarray | None]:
    """Check 3: Square and, with a surrogate model, transfer from PGD on it (None: not run)."""
    s, b = self.setup, self.budget
    out = {f"square ({b.square_queries} queries)": producers.registry_masks(
        s, "square", [s.eps], {"n_queries": b.square_queries})[0]}
    transfer = f"transfer (pgd-{b.transfer_steps} on surrogate)"
    out[transfer] = None
    if self.surrogate is not None:
      x_adv = core.run_in_batches(pgd, batching.bind(*self.surrogate), s.x[s.todo], s.y[s.todo],
                                  key=jax.random.fold_in(self.key, 300), batch_size=s.batch_size,
                                  eps=s.eps, hparams=(("norm", s.norm),
                                                      ("steps", b.transfer_steps)))
      out[transfer] = producers.still_robust(s, x_adv, s.eps)
    return out

  @functools.cached_property
  def noise(self) -> np.ndarray:
    """Check 7: still-robust mask [N] under `noise_draws` random points at distance eps."""
    s = self.setup
    fn = functools.partial(producers.noise_fooled, batching.as_pytree(s.logits_fn),
                           jnp.float32(s.eps), norm=s.norm, draws=self.budget.noise_draws)
    fooled = batching.map_batches(fn, [s.x[s.todo], s.y[s.todo]], s.batch_size,
                                  key=jax.random.fold_in(self.key, 400))
    mask = s.clean_correct.copy()
    mask[s.todo] = ~fooled
    return mask


def _eps_sweep_checks(r: Runs) -> list[dict]:
  s, (values, masks) = r.setup, r.sweep
  return [grading.check_eps_sweep(values, masks, clean_accuracy=float(s.clean_correct.mean()),
                                  chance=1.0 / s.num_classes, grey_bound=r.grey_bound,
                                  tolerance=s.tolerance),
          grading.check_fgsm(values, masks["fgsm"],
                             {n: m for n, m in masks.items() if n != "fgsm"},
                             tolerance=s.tolerance)]


def _convergence_check(r: Runs) -> list[dict]:
  b, (masks, restart_mask, _) = r.budget, r.convergence
  return [grading.check_convergence(b.convergence_steps, masks, restart_mask,
                                    restarts=b.restarts, restart_steps=b.restart_steps,
                                    tolerance=r.setup.tolerance)]


def _losses_check(r: Runs) -> list[dict]:
  # CE's worst case: every FGSM, PGD and APGD-CE run.
  ce = np.logical_and.reduce([m for n, m in r.whitebox_runs.items()
                              if n.startswith(("fgsm", "pgd", "apgd-ce"))])
  others, skipped = r.losses
  return [grading.check_losses(ce, others, skipped=skipped, tolerance=r.setup.tolerance)]


def _black_box_check(r: Runs) -> list[dict]:
  return [grading.check_black_box(r.whitebox, r.black_box, tolerance=r.setup.tolerance)]


def _noise_check(r: Runs) -> list[dict]:
  return [grading.check_noise(r.whitebox, r.noise, r.setup.clean_correct,
                              draws=r.budget.noise_draws, tolerance=r.setup.tolerance)]


def _gradients_check(r: Runs) -> list[dict]:
  s = r.setup
  return [producers.check_gradients(s.logits_fn, s.x, s.y, key=jax.random.fold_in(r.key, 500),
                                    eps=s.eps, norm=s.norm, directions=r.budget.fd_directions,
                                    batch_size=s.batch_size)]


def _determinism_check(r: Runs) -> list[dict]:
  return [producers.check_determinism(*r.model, r.setup.x[:r.setup.batch_size])]


# (phase, the checks it grades): the report lists the checks by id, the seconds by phase.
STEPS: tuple[tuple[str, Callable[[Runs], list[dict]]], ...] = (
    ("eps_sweep", _eps_sweep_checks), ("convergence", _convergence_check),
    ("losses", _losses_check), ("black_box", _black_box_check), ("noise", _noise_check),
    ("gradients", _gradients_check), ("determinism", _determinism_check))


def _check_inputs(x, y, eps: float, norm: str, budget) -> tuple[np.ndarray, np.ndarray, Budget]:
  x, y = numerics.check_batch(x, y)
  core.check_eps(eps, norm)
  if eps <= 0:
    raise ValueError(f"eps must be > 0 for the checklist, got {eps}.")
  if isinstance(budget, str):
    if budget not in BUDGETS:
      raise ValueError(f"unknown budget {budget!r}: choose one of {sorted(BUDGETS)} or pass a "
                       "checklist.Budget.")
    budget = BUDGETS[budget]
  if budget.restart_steps not in budget.convergence_steps or len(budget.convergence_steps) < 2:
    raise ValueError("Budget.convergence_steps needs >= 2 entries including restart_steps, got "
                     f"{budget.convergence_steps} and restart_steps={budget.restart_steps}.")
  return x, y, budget


def run_checklist(apply_fn: Callable, variables: Any, x, y, *, key: jax.Array,
                  eps: float = 8 / 255, out_dir: str | Path | None,
                  surrogate: tuple[Callable, Any] | None = None,
                  budget: str | Budget = "default", norm: str = "linf", batch_size: int = 500,
                  progress: bool = False) -> dict:
  """Runs the eight gradient-masking checks on a model and writes the report.

  Args:
    apply_fn, variables: the model, ``apply_fn(variables, images in [0, 1]) -> logits``
      (``gfa_jax.load_model``'s result).
    x, y: test images [N, H, W, C] in [0, 1] and int labels [N].
    key: PRNG key of every random choice.
    eps: the threat model's radius in `norm` ('linf' or 'l2').
    out_dir: receives checklist.json, checklist.md, eps_sweep.png and convergence.png
      (gfa_jax.reporting.write_checklist); None writes nothing (the caller writes).
    surrogate: optional ``(apply_fn, variables)`` of a standard-trained model for the transfer
      attack of check 3; without it check 3 says so (WARN), it never pretends.
    budget: 'default' (AutoAttack scale), 'quick' (smaller, same checks) or a ``Budget``.
    batch_size: images per model call.

  Returns the report dict written to checklist.json: 'checks' (id, name, status, verdict,
  numbers), 'robust_accuracy' (per-example worst case over every attack run at eps),
  'attacks' (each run's robust accuracy at eps), 'still_robust' [N], 'summary', settings and
  'seconds' per phase.
  """
  start = time.perf_counter()
  x, y, b = _check_inputs(x, y, eps, norm, budget)
  logits_fn = batching.bind(apply_fn, variables)
  clean_correct = batching.predict(logits_fn, x, batch_size) == y
  if not clean_correct.any():
    raise ValueError("the model classifies none of the examples correctly: there is nothing to "
                     "attack. Check the checkpoint, the labels and the data set.")
  num_classes = int(jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, *x.shape[1:]),
                                                                   jnp.float32)).shape[-1])
  setup = Setup(logits_fn, x, y, float(eps), norm, clean_correct, num_classes, batch_size,
                int(jax.random.randint(key, (), 0, 2 ** 31 - 1)), progress)
  runs = Runs((apply_fn, variables), setup, b, key, surrogate)
  checks, seconds = [], {}
  for phase, grade in STEPS:
    tick = time.perf_counter()
    checks += grade(runs)
    seconds[phase] = time.perf_counter() - tick
  checks.sort(key=lambda c: c["id"])

  all_masks = {**runs.whitebox_runs,
               **{n: m for n, m in runs.black_box.items() if m is not None},
               f"noise ({b.noise_draws} draws)": runs.noise}
  worst = np.logical_and.reduce(list(all_masks.values()))
  report = {
      "eps": setup.eps, "eps_text": grading.eps_text(setup.eps), "norm": norm,
      "num_examples": int(len(x)), "num_classes": num_classes,
      "budget": budget if isinstance(budget, str) else "custom",
      "budget_settings": dataclasses.asdict(b), "seed": setup.seed,
      "clean_accuracy": float(clean_correct.mean()),
      "robust_accuracy": float(worst.mean()),
      "attacks": {name: float(m.mean()) for name, m in all_masks.items()},
      "summary": {s: sum(c["status"] == s for c in checks) for s in (PASS, WARN, FAIL)},
      "checks": checks,
      # Mean over the attacked points of the best CE loss after each iteration (row 0: start).
      "convergence_trace": {name: t.mean(axis=1).tolist()
                            for name, t in runs.convergence[2].items()},
      "clean_correct": clean_correct.tolist(), "still_robust": worst.tolist(),
      "seconds": seconds}
  report["seconds"]["total"] = time.perf_counter() - start
  if out_dir is not None:
    report["files"] = reporting.write_checklist(report, Path(out_dir))
  return report

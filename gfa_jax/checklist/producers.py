"""What the checklist measures: memoised producers of robust masks and the gradient and
determinism probes (every model call of the checklist is here; grading.py only reads numbers).

Attacks come from ``gfa_jax.attacks`` and run through ``gfa_jax.evaluate.run_attack`` (which
checks that every adversarial example lies within eps and recomputes robust accuracy by a
forward pass); runs evaluate cannot express (APGD with its loss trace, transfer, noise) use the
same bounds check and forward pass through ``still_robust``. Models are traced arguments of
the jitted probes (``batching.bind``), so a second model of one architecture compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax import batching, evaluate, numerics
from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd
from gfa_jax.checklist import grading

@dataclasses.dataclass(frozen=True)
class Budget:
  """Iterations and draws of each part of the checklist."""
  sweep_pgd_steps: int  # PGD in the eps sweep (checks 1, 2)
  sweep_apgd_steps: int  # APGD-CE in the eps sweep (checks 1, 2)
  convergence_steps: tuple[int, ...]  # APGD-CE iteration counts compared (check 4)
  restarts: int  # APGD-CE restarts compared with one (check 4)
  restart_steps: int  # iterations of each restart
  loss_steps: int  # APGD-DLR, APGD-T, APGD-margin iterations (check 5)
  targets: int  # APGD-T target classes
  square_queries: int  # Square attack queries per point (check 3)
  transfer_steps: int  # PGD on the surrogate (check 3)
  noise_draws: int  # random points per example (check 7)
  fd_directions: int  # random directions per example for finite differences (check 6)


BUDGETS = {
    # Carlini et al. / AutoAttack scale: 1000-iteration convergence check, 5,000 Square queries.
    "default": Budget(sweep_pgd_steps=20, sweep_apgd_steps=100, convergence_steps=(10, 100, 1000),
                      restarts=5, restart_steps=100, loss_steps=100, targets=9,
                      square_queries=5000, transfer_steps=100, noise_draws=100,
                      fd_directions=16),
    # Minutes on a CPU for ~100 SmallCNN images; the same checks, smaller budgets.
    "quick": Budget(sweep_pgd_steps=10, sweep_apgd_steps=10, convergence_steps=(10, 50, 100),
                    restarts=3, restart_steps=50, loss_steps=50, targets=3,
                    square_queries=1000, transfer_steps=20, noise_draws=20, fd_directions=8),
}


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every part of the checklist needs: the model, the data and the bookkeeping."""
  logits_fn: Callable[[jax.Array], jax.Array]
  x: np.ndarray
  y: np.ndarray
  eps: float
  norm: str
  clean_correct: np.ndarray
  num_classes: int
  batch_size: int
  seed: int
  progress: bool

  @property
  def todo(self) -> np.ndarray:
    """Indices of the correctly classified points, the only ones attacked (as in AutoAttack)."""
    return np.flatnonzero(self.clean_correct)

  @property
  def tolerance(self) -> float:
    return max(grading.TOLERANCE, 1.0 / len(self.x))


def eps_sweep(eps: float, norm: str, image_shape: Sequence[int]) -> list[float]:
  """eps * 2**k for k = -3, -2, ... below the largest radius, then the largest radius: Linf 0.5
  or L2 sqrt(D)/2, where the mid-grey image lies in every ball, so any classifier can be
  brought down to the share of its most frequent prediction (check 1's end point)."""
  largest = 0.5 if norm == "linf" else float(np.sqrt(np.prod(image_shape))) / 2
  values = [eps * 2.0 ** k for k in range(-3, 64) if eps * 2.0 ** k < largest * (1 - 1e-9)]
  return values + [max(largest, eps)]


def registry_masks(setup: Setup, name: str, eps: Sequence[float],
                   overrides: dict | None = None) -> np.ndarray:
  """Still-robust masks [len(eps), N] of a registered attack, via evaluate.run_attack."""
  result = evaluate.run_attack(name, setup.logits_fn, setup.x, setup.y, eps=list(eps),
                               norm=setup.norm, clean_correct=setup.clean_correct,
                               batch_size=setup.batch_size, seed=setup.seed,
                               overrides=overrides, progress=setup.progress)
  return np.asarray(result["still_robust"], bool)


def still_robust(setup: Setup, x_adv_todo: np.ndarray, eps: float) -> np.ndarray:
  """[N] mask: clean-correct points still classified correctly at their adversarial example
  (given for the attacked points, setup.todo), after checking every example lies within eps
  and in [0, 1]: evaluate.checked_robust_mask, for the runs evaluate.run_attack cannot express."""
  x_adv = setup.x.copy()
  x_adv[setup.todo] = x_adv_todo
  return evaluate.checked_robust_mask(setup.logits_fn, x_adv, setup.x, setup.y,
                                      setup.clean_correct, eps, setup.norm, setup.batch_size)


@functools.partial(jax.jit, static_argnames=("norm", "steps"))
def _apgd_ce_traced(logits_fn, eps, x, y, key, *, norm, steps):
  x_adv, trace = apgd(logits_fn, x, y, key=key, eps=eps, norm=norm, loss="ce", steps=steps,
                      return_trace=True)
  return x_adv, trace.T  # batch first


def apgd_ce_run(setup: Setup, steps: int, key: jax.Array, eps: float | None = None):
  """One APGD-CE run (AutoAttack's settings, `steps` iterations) on the attacked points.

  Returns (still-robust mask [N], best CE loss after each iteration [steps + 1, attacked
  points]). eps is a traced argument: one compilation per iteration count serves the eps sweep,
  the convergence runs and the restarts (a restart is a run with another key, as in apgd's own
  n_restarts loop: a point is broken if any run breaks it, the trace is the elementwise max).
  """
  eps = setup.eps if eps is None else eps
  fn = functools.partial(_apgd_ce_traced, batching.as_pytree(setup.logits_fn), jnp.float32(eps),
                         norm=setup.norm, steps=steps)
  todo = setup.todo
  x_adv, trace = batching.map_batches(fn, [setup.x[todo], setup.y[todo]], setup.batch_size,
                                      key=key)
  return still_robust(setup, x_adv, eps), trace.T


@functools.partial(jax.jit, static_argnames=("norm", "draws"))
def noise_fooled(logits_fn, eps, x, y, key, *, norm, draws):
  """Per example: does any of `draws` random points at distance eps fool the model? Linf:
  random corners of the cube (x + eps * random signs, the farthest noise in every pixel);
  L2: random directions on the sphere. Both clipped into [0, 1]."""
  def body(i, fooled):
    k = jax.random.fold_in(key, i)
    if norm == "linf":
      x_noisy = jnp.clip(x + eps * jax.random.rademacher(k, x.shape, x.dtype), 0.0, 1.0)
    else:
      x_noisy = core.random_init(k, x, eps, norm, on_sphere=True)
    return fooled | numerics.misclassified(logits_fn(x_noisy), y)
  return jax.lax.fori_loop(0, draws, body, jnp.zeros(x.shape[:1], bool))


@functools.partial(jax.jit, static_argnames=("directions",))
def _gradient_probe(logits_fn, x, y, key, *, directions):
  """Per example: CE and margin losses, their input gradients' L1/L2 norms, whether they are
  all zero or contain non-finite values, and, for the margin loss, the analytic directional
  derivative and its central finite difference along `directions` random sign directions."""
  out, grads = {}, {}
  for name, loss_fn in (("ce", numerics.cross_entropy), ("margin", numerics.margin_loss)):
    loss, _, grads[name] = numerics.loss_and_grad(logits_fn, loss_fn)(x, y)
    flat = grads[name].reshape(x.shape[0], -1)
    out[name] = {"loss": loss, "l1": jnp.sum(jnp.abs(flat), axis=1),
                 "l2": numerics.safe_norm(flat, axis=1), "zero": jnp.all(flat == 0, axis=1),
                 "finite": jnp.all(jnp.isfinite(flat), axis=1) & jnp.isfinite(loss)}

  def along(k):
    v = jax.random.rademacher(k, x.shape, x.dtype)
    analytic = jnp.sum((grads["margin"] * v).reshape(x.shape[0], -1), axis=1)
    plus = numerics.margin_loss(logits_fn(x + grading.FD_STEP * v), y)
    minus = numerics.margin_loss(logits_fn(x - grading.FD_STEP * v), y)
    return analytic, (plus - minus) / (2 * grading.FD_STEP)

  analytic, finite_difference = jax.lax.map(along, jax.random.split(key, directions))
  out["directional"] = {"analytic": analytic.T, "finite_difference": finite_difference.T}
  return out


def check_gradients(logits_fn: Callable[[jax.Array], jax.Array], x, y, *, key: jax.Array,
                    eps: float, norm: str = "linf", directions: int = 16,
                    batch_size: int = 500, tolerance: float = grading.TOLERANCE) -> dict:
  """Check 6 on images x [N, H, W, C] and int labels y [N]: input-gradient health at every
  point, for the CE and margin losses, and `directions` finite-difference probes per point."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  probe_fn = functools.partial(_gradient_probe, batching.as_pytree(logits_fn),
                               directions=directions)
  probe = batching.map_batches(probe_fn, [x, y], batch_size, key=key)
  return grading.grade_gradients(probe, eps=eps, norm=norm, tolerance=max(tolerance, 1 / len(x)))


def determinism_probe(apply_fn: Callable, variables: Any, x) -> dict:
  """Check 8's numbers on a batch x: how much forward passes (eager twice, jit once) differ,
  and how much the first half of the batch alone differs from it in the full batch."""
  x = np.asarray(x, np.float32)
  logits_fn = batching.bind(apply_fn, variables)
  passes = [np.asarray(apply_fn(variables, x)), np.asarray(apply_fn(variables, x)),
            np.asarray(jax.jit(logits_fn)(x))]
  scale = max(float(np.abs(passes[0]).max()), 1e-30)
  half = max(len(x) // 2, 1)
  alone = np.asarray(apply_fn(variables, x[:half]))
  argmax = [p.argmax(-1) for p in passes]
  numbers = {
      "repeat_max_relative_difference": max(float(np.abs(p - passes[0]).max()) / scale
                                            for p in passes[1:]),
      "repeat_prediction_changes": int(sum((a != argmax[0]).sum() for a in argmax[1:])),
      "batch_max_relative_difference": float(np.abs(alone - passes[0][:half]).max()) / scale,
      "batch_prediction_changes": int((alone.argmax(-1) != argmax[0][:half]).sum()),
      "num_examples": int(len(x))}
  return numbers


def check_determinism(apply_fn: Callable, variables: Any, x) -> dict:
  """Check 8 on a batch x: forward passes eager twice and jit once must agree (randomness
  would need EOT), and the first half of the batch alone must give the same logits."""
  return grading.grade_determinism(determinism_probe(apply_fn, variables, x))

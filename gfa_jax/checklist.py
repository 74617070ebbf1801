"""Is the robustness real or gradient masking? An automated checklist with the evidence.

``run_checklist`` attacks a model the ways Carlini et al. (2019, "On Evaluating Adversarial
Robustness"), Athalye et al. (2018, "Obfuscated Gradients Give a False Sense of Security") and
AutoAttack's own sanity checks (Croce & Hein 2020) prescribe, and grades eight checks PASS, WARN
or FAIL from the numbers, each with a verdict sentence written from them:

  1. robust accuracy falls with eps and reaches 0% (or chance) at Linf 0.5 / L2 sqrt(D)/2;
  2. iterative attacks (PGD, APGD-CE) are at least as strong as FGSM at every eps;
  3. white-box attacks beat black-box (Square) and transfer (PGD on a surrogate) per example;
  4. APGD-CE has converged: more iterations and restarts change robust accuracy < tolerance;
  5. several losses (CE, DLR, targeted DLR, margin) agree;
  6. input gradients are healthy: not zero, tiny or non-finite, and equal to finite differences;
  7. random noise of the same eps succeeds less often than the white-box attacks;
  8. inference is deterministic (no randomness that would need EOT).

Every comparison is per example: "attack A beats B" counts the points A breaks that B does not.
The reported robust accuracy is the per-example worst case over everything run at eps. Attacks
come from ``gfa_jax.attacks`` and run through ``gfa_jax.evaluate.run_attack`` (which checks that
every adversarial example lies within eps and recomputes robust accuracy by a forward pass);
runs evaluate cannot express (APGD with its loss trace, transfer, noise) use the same bounds
check and forward pass through ``_still_robust``. Thresholds are module constants, documented
with their reasons in docs/checklist.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax import batching, evaluate, plots
from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd
from gfa_jax.attacks.pgd import pgd
from gfa_jax.checkpoints import write_atomically

PASS, WARN, FAIL = 'PASS', 'WARN', 'FAIL'
_SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}

# A difference between two attacks (fraction of the N points) passes up to TOLERANCE, at least
# one example; up to FAIL_FACTOR times that it is a warning, beyond it a failure.
TOLERANCE = 0.01
FAIL_FACTOR = 3
# Check 5 fails only if other losses also break more than this share of CE's robust points.
MASKING_SHARE = 1 / 3
# Finite differences: central, step FD_STEP per pixel along random sign directions, of the
# margin loss (logit differences: no softmax saturation). Per point, the vector of analytic
# directional derivatives d over the directions must match the finite differences f:
# ||d - f|| <= FD_RTOL * max(||d||, ||f||, floor), floor = FD_ATOL * (1 + |L|) / FD_STEP * sqrt(k)
# (float32 rounding of the loss values, k directions). Per direction, ReLU and max-pool kinks
# crossed within the step make single differences noisy; pooled over 8-16 directions, trained
# SmallCNNs (standard and GFA, 200 CIFAR-10 test images) stay below 0.18 at FD_STEP = 1e-4
# (median 0.03; float64 gives the same), while wrong gradients give ~1 (zero) or ~2 (flipped).
FD_STEP = 1e-4
FD_RTOL = 0.3
FD_ATOL = 1e-6
# A gradient is tiny when a full eps step along it would change the loss by less than float32
# resolves: eps * ||g||_dual < TINY_CHANGE * (1 + |L|).
TINY_CHANGE = 1e-6
# Determinism: two forward passes must agree to this relative tolerance (bitwise on CPU; GPU
# kernels may reorder sums) and predict the same classes.
REPEAT_RTOL = 1e-5
BATCH_RTOL = 1e-4


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
    'default': Budget(sweep_pgd_steps=20, sweep_apgd_steps=100, convergence_steps=(10, 100, 1000),
                      restarts=5, restart_steps=100, loss_steps=100, targets=9,
                      square_queries=5000, transfer_steps=100, noise_draws=100,
                      fd_directions=16),
    # Minutes on a CPU for ~100 SmallCNN images; the same checks, smaller budgets.
    'quick': Budget(sweep_pgd_steps=10, sweep_apgd_steps=10, convergence_steps=(10, 50, 100),
                    restarts=3, restart_steps=50, loss_steps=50, targets=3,
                    square_queries=1000, transfer_steps=20, noise_draws=20, fd_directions=8),
}


@dataclasses.dataclass(frozen=True)
class _Setup:
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
    return max(TOLERANCE, 1.0 / len(self.x))


# --------------------------------------------------------------------------------------------
# Formatting.


def eps_text(value: float) -> str:
  """'8/255' for multiples of 1/255, else a short decimal."""
  k = value * 255
  return f'{round(k)}/255' if round(k) > 0 and abs(k - round(k)) < 1e-6 else f'{value:.4g}'


def _pct(fraction: float | None) -> str:
  return 'n/a' if fraction is None else f'{100 * fraction:.1f}%'


def _num(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.2g}'


def _finite_or_none(value: float) -> float | None:
  """A float for JSON, None where it is NaN or infinite (strict JSON has neither)."""
  return float(value) if np.isfinite(value) else None


def _grade(excess: float, tolerance: float) -> str:
  if excess <= tolerance:
    return PASS
  return WARN if excess <= FAIL_FACTOR * tolerance else FAIL


def _worst(*statuses: str) -> str:
  return max(statuses, key=_SEVERITY.__getitem__)


def _check(number: int, name: str, status: str, verdict: str, numbers: dict) -> dict:
  return {'id': number, 'name': name, 'status': status, 'verdict': verdict, 'numbers': numbers}


# --------------------------------------------------------------------------------------------
# Running attacks: masks of "still robust" points, [N] per eps.


def eps_sweep(eps: float, norm: str, image_shape: Sequence[int]) -> list[float]:
  """eps * 2**k for k = -3, -2, ... below the largest radius, then the largest radius: Linf 0.5
  or L2 sqrt(D)/2, where the mid-grey image lies in every ball, so any classifier can be
  brought down to the share of its most frequent prediction (check 1's end point)."""
  largest = 0.5 if norm == 'linf' else float(np.sqrt(np.prod(image_shape))) / 2
  values = [eps * 2.0 ** k for k in range(-3, 64) if eps * 2.0 ** k < largest * (1 - 1e-9)]
  return values + [max(largest, eps)]


def _registry_masks(setup: _Setup, name: str, eps: Sequence[float],
                    overrides: dict | None = None) -> np.ndarray:
  """Still-robust masks [len(eps), N] of a registered attack, via evaluate.run_attack."""
  result = evaluate.run_attack(name, setup.logits_fn, setup.x, setup.y, eps=list(eps),
                               norm=setup.norm, clean_correct=setup.clean_correct,
                               batch_size=setup.batch_size, seed=setup.seed,
                               overrides=overrides, progress=setup.progress)
  return np.asarray(result['still_robust'], bool)


def _still_robust(setup: _Setup, x_adv_todo: np.ndarray, eps: float) -> np.ndarray:
  """[N] mask: clean-correct points still classified correctly at their adversarial example
  (given for the attacked points, setup.todo), after checking every example lies within eps
  and in [0, 1]. The same bookkeeping as evaluate.run_attack, for runs it cannot express."""
  x_adv = setup.x.copy()
  x_adv[setup.todo] = x_adv_todo
  core.check_adversarial(x_adv, setup.x, eps, setup.norm)
  return setup.clean_correct & (batching.predict(setup.logits_fn, x_adv, setup.batch_size) == setup.y)


def _batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int,
             key: jax.Array) -> Any:
  """fn(*batch, key_i) over batches of the arrays (the last padded by repeating its last row,
  so fn compiles once); outputs are pytrees of batch-first arrays, concatenated (numpy)."""
  n = len(arrays[0])
  size = min(batch_size, n)
  outs = []
  for i, start in enumerate(range(0, n, size)):
    stop = min(start + size, n)
    batch = [np.concatenate([a[start:stop], np.repeat(a[stop - 1:stop], size - (stop - start),
                                                      axis=0)]) for a in arrays]
    out = jax.device_get(fn(*batch, jax.random.fold_in(key, i)))
    outs.append(jax.tree.map(lambda o, k=stop - start: o[:k], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


@functools.partial(jax.jit, static_argnames=('logits_fn', 'norm', 'steps'))
def _apgd_ce_traced(x, y, key, eps, *, logits_fn, norm, steps):
  x_adv, trace = apgd(logits_fn, x, y, key=key, eps=eps, norm=norm, loss='ce', steps=steps,
                      return_trace=True)
  return x_adv, trace.T  # batch first


def _apgd_ce_run(setup: _Setup, steps: int, key: jax.Array, eps: float | None = None):
  """One APGD-CE run (AutoAttack's settings, `steps` iterations) on the attacked points.

  Returns (still-robust mask [N], best CE loss after each iteration [steps + 1, attacked
  points]). eps is a traced argument: one compilation per iteration count serves the eps sweep,
  the convergence runs and the restarts (a restart is a run with another key, as in apgd's own
  n_restarts loop: a point is broken if any run breaks it, the trace is the elementwise max).
  """
  eps = setup.eps if eps is None else eps
  fn = functools.partial(_apgd_ce_traced, eps=jnp.float32(eps), logits_fn=setup.logits_fn,
                         norm=setup.norm, steps=steps)
  todo = setup.todo
  x_adv, trace = _batched(fn, (setup.x[todo], setup.y[todo]), setup.batch_size, key)
  return _still_robust(setup, x_adv, eps), trace.T


@functools.partial(jax.jit, static_argnames=('logits_fn', 'norm', 'draws'))
def _noise_fooled(x, y, key, eps, *, logits_fn, norm, draws):
  """Per example: does any of `draws` random points at distance eps fool the model? Linf:
  random corners of the cube (x + eps * random signs, the farthest noise in every pixel);
  L2: random directions on the sphere. Both clipped into [0, 1]."""
  def body(i, fooled):
    k = jax.random.fold_in(key, i)
    if norm == 'linf':
      x_noisy = jnp.clip(x + eps * jax.random.rademacher(k, x.shape, x.dtype), 0.0, 1.0)
    else:
      x_noisy = core.random_init(k, x, eps, norm, on_sphere=True)
    return fooled | core.misclassified(logits_fn(x_noisy), y)
  return jax.lax.fori_loop(0, draws, body, jnp.zeros(x.shape[:1], bool))


@functools.partial(jax.jit, static_argnames=('logits_fn', 'directions'))
def _gradient_probe(x, y, key, *, logits_fn, directions):
  """Per example: CE and margin losses, their input gradients' L1/L2 norms, whether they are
  all zero or contain non-finite values, and, for the margin loss, the analytic directional
  derivative and its central finite difference along `directions` random sign directions."""
  out, grads = {}, {}
  for name, loss_fn in (('ce', core.ce_loss), ('margin', core.margin_loss)):
    loss, _, grads[name] = core.loss_and_grad(logits_fn, loss_fn)(x, y)
    flat = grads[name].reshape(x.shape[0], -1)
    out[name] = {'loss': loss, 'l1': jnp.sum(jnp.abs(flat), axis=1),
                 'l2': core.lp_norm(flat, 'l2'), 'zero': jnp.all(flat == 0, axis=1),
                 'finite': jnp.all(jnp.isfinite(flat), axis=1) & jnp.isfinite(loss)}

  def along(k):
    v = jax.random.rademacher(k, x.shape, x.dtype)
    analytic = jnp.sum((grads['margin'] * v).reshape(x.shape[0], -1), axis=1)
    plus = core.margin_loss(logits_fn(x + FD_STEP * v), y)
    minus = core.margin_loss(logits_fn(x - FD_STEP * v), y)
    return analytic, (plus - minus) / (2 * FD_STEP)

  analytic, finite_difference = jax.lax.map(along, jax.random.split(key, directions))
  out['directional'] = {'analytic': analytic.T, 'finite_difference': finite_difference.T}
  return out


# --------------------------------------------------------------------------------------------
# The checks: pure functions of the masks and numbers, so each grading rule is testable alone.


def check_eps_sweep(eps_values: Sequence[float], masks: Mapping[str, np.ndarray], *,
                    clean_accuracy: float, chance: float, grey_bound: float,
                    tolerance: float) -> dict:
  """Check 1. masks: {attack: still-robust [len(eps), N]}; the worst case per point and eps."""
  worst = np.logical_and.reduce(list(masks.values()))
  accuracy = worst.mean(axis=1)
  broken_before = np.logical_or.accumulate(~worst, axis=0)
  non_monotone = np.any(worst[1:] & broken_before[:-1], axis=0)  # robust after being broken
  final = float(accuracy[-1])
  status = PASS if final <= tolerance else WARN if final <= chance + tolerance else FAIL
  monotone = non_monotone.mean() <= tolerance
  if not monotone:
    status = _worst(status, WARN)
  names = ', '.join(masks)
  end = ('The attacks reach 0%, as they must on any model.' if final <= tolerance else
         'The attacks reach chance but not 0%: they are weaker than they should be.'
         if final <= chance + tolerance else
         'The attacks cannot break the model even where the threat model allows replacing the '
         'image: they are failing (gradient masking or a bug).')
  if not monotone:
    end += (' Points that survive a larger eps after being broken at a smaller one show the '
            'attacks do not find the best point in the ball.')
  verdict = (
      f'Robust accuracy (per-point worst case of {names}) falls from {_pct(clean_accuracy)} '
      f'clean to {_pct(accuracy[0])} at eps {eps_text(eps_values[0])} and '
      f'{_pct(final)} at eps {eps_text(eps_values[-1])} (chance {_pct(chance)}; the mid-grey '
      f'image, inside every ball of that radius, alone leaves {_pct(grey_bound)}); '
      f'{int(non_monotone.sum())} point(s) survive a larger eps after being broken at a smaller '
      'one. ' + end)
  return _check(1, 'robust accuracy vs eps reaches 0 / chance', status, verdict, {
      'eps': [float(e) for e in eps_values], 'eps_text': [eps_text(e) for e in eps_values],
      'robust_accuracy': {name: m.mean(axis=1).tolist() for name, m in masks.items()},
      'worst_case': accuracy.tolist(), 'clean_accuracy': clean_accuracy,
      'chance': chance, 'grey_image_bound': grey_bound,
      'non_monotone_points': int(non_monotone.sum()), 'tolerance': tolerance})


def check_fgsm(eps_values: Sequence[float], fgsm_masks: np.ndarray,
               iterative: Mapping[str, np.ndarray], *, tolerance: float) -> dict:
  """Check 2. Iterative attacks must leave no more points robust than FGSM at any eps."""
  fgsm_acc = fgsm_masks.mean(axis=1)
  excess = {name: (m.mean(axis=1) - fgsm_acc).tolist() for name, m in iterative.items()}
  missed = ~fgsm_masks & np.logical_and.reduce(list(iterative.values()))  # FGSM-only breaks
  worst_excess = max(max(v) for v in excess.values())
  status = _grade(worst_excess, tolerance)
  if status == PASS and missed.mean(axis=1).max() > tolerance:
    status = WARN
  at = int(np.argmax([max(v[i] for v in excess.values()) for i in range(len(eps_values))]))
  verdict = (
      f'Largest excess of an iterative attack\'s robust accuracy over FGSM: '
      f'{100 * worst_excess:+.1f} points' +
      (f' (at eps {eps_text(eps_values[at])})' if worst_excess > 0 else '') + '; at most '
      f'{int(missed.sum(axis=1).max())} point(s) at one eps are broken by FGSM but by none of '
      f'{", ".join(iterative)}. ' + {
          PASS: 'Iterative attacks are at least as strong as one gradient step everywhere.',
          WARN: 'FGSM finds some points the iterative attacks miss: their steps or start are '
                'off for this model (a sign of a rugged or masked loss).',
          FAIL: 'A single step beats many iterations: the classic symptom of gradient masking '
                '(Carlini et al. 2019) or a broken attack.'}[status])
  return _check(2, 'iterative attacks at least as strong as FGSM', status, verdict, {
      'eps': [float(e) for e in eps_values], 'fgsm_robust_accuracy': fgsm_acc.tolist(),
      'robust_accuracy': {name: m.mean(axis=1).tolist() for name, m in iterative.items()},
      'excess_over_fgsm': excess, 'fgsm_only_points': missed.sum(axis=1).tolist(),
      'tolerance': tolerance})


def check_black_box(whitebox: np.ndarray, black_box: Mapping[str, np.ndarray | None], *,
                    tolerance: float) -> dict:
  """Check 3. No black-box or transfer attack may break points every white-box attack missed.
  A None mask means the attack was not run (WARN, never a silent pass)."""
  numbers: dict[str, Any] = {'whitebox_robust_accuracy': float(whitebox.mean()),
                             'tolerance': tolerance}
  statuses, parts = [], []
  for name, mask in black_box.items():
    if mask is None:
      statuses.append(WARN)
      numbers[name] = None
      parts.append(f'{name}: not run (no surrogate model given)')
      continue
    only = whitebox & ~mask
    statuses.append(_grade(float(only.mean()), tolerance))
    numbers[name] = {'robust_accuracy': float(mask.mean()), 'only_points': int(only.sum()),
                     'only_fraction': float(only.mean())}
    parts.append(f'{name} leaves {_pct(mask.mean())} and breaks {int(only.sum())} point(s) '
                 'no white-box attack broke')
  status = _worst(*statuses)
  ran = [n for n, m in black_box.items() if m is not None]
  ran_status = _worst(PASS, *(s for s, m in zip(statuses, black_box.values()) if m is not None))
  if status == PASS:
    conclusion = 'Gradients find everything the black-box attacks find.'
  elif ran_status == PASS:
    conclusion = ('Gradients find everything the attacks run find, but the comparison is '
                  'incomplete: pass a standard-trained surrogate for the transfer attack.')
  else:
    conclusion = (f'{" / ".join(ran)} succeed where gradients fail: gradient masking (Athalye '
                  'et al. 2018); trust the worst case, not the white-box number.')
  verdict = f'White-box attacks leave {_pct(whitebox.mean())}; ' + '; '.join(parts) + '. ' + \
      conclusion
  return _check(3, 'white-box beats black-box and transfer', status, verdict, numbers)


def check_convergence(steps: Sequence[int], masks: Sequence[np.ndarray], restart_mask: np.ndarray,
                      *, restarts: int, restart_steps: int, tolerance: float) -> dict:
  """Check 4. masks[k]: APGD-CE with steps[k] iterations; restart_mask: `restarts` restarts of
  restart_steps iterations, compared with the single run of that length."""
  gains = [float((a & ~b).mean()) for a, b in zip(masks[:-1], masks[1:])]  # newly broken
  single = masks[list(steps).index(restart_steps)]
  restart_gain = float((single & ~restart_mask).mean())
  status = _grade(max(gains[-1], restart_gain), tolerance)
  accs = [float(m.mean()) for m in masks]
  verdict = (
      'APGD-CE robust accuracy with ' + ', '.join(f'{s} iterations {_pct(a)}'
                                                  for s, a in zip(steps, accs)) +
      f'; going from {steps[-2]} to {steps[-1]} iterations breaks {_pct(gains[-1])} more of the '
      f'points, {restarts} restarts of {restart_steps} iterations break {_pct(restart_gain)} more '
      f'(tolerance {_pct(tolerance)}). ' + {
          PASS: 'The attack has converged.',
          WARN: 'The attack has not quite converged: more iterations or restarts still help.',
          FAIL: 'The attack is far from converged: robust accuracy at smaller budgets '
                'overestimates robustness.'}[status])
  return _check(4, 'attack convergence (iterations, restarts)', status, verdict, {
      'steps': list(steps), 'robust_accuracy': accs, 'newly_broken': gains,
      'restarts': restarts, 'restart_steps': restart_steps,
      'restarts_robust_accuracy': float(restart_mask.mean()),
      'restarts_newly_broken': restart_gain, 'tolerance': tolerance})


def check_losses(ce: np.ndarray, others: Mapping[str, np.ndarray | None], *,
                 skipped: Mapping[str, str], tolerance: float) -> dict:
  """Check 5. ce: worst case over every CE run; others: {loss: mask}. Points robust under CE
  but broken by another loss show CE-specific masking (e.g. a saturated softmax)."""
  ran = {name: m for name, m in others.items() if m is not None}
  worst = np.logical_and.reduce([ce, *ran.values()])
  gain = float((ce & ~worst).mean())
  # Share of CE's robust points that other losses break. On sound adversarially trained models
  # targeted losses routinely break a few of them (AutoAttack's APGD-T lowers APGD-CE's
  # number by a few points; here 4-5 of ~28 robust points for TRADES and GradAlign), so a
  # large absolute gain is a failure only when it is also a large share: masking by a
  # saturated CE leaves most CE-robust points breakable.
  broken_share = gain / float(ce.mean()) if ce.any() else 0.0
  status = _grade(gain, tolerance)
  if status == FAIL and broken_share <= MASKING_SHARE:
    status = WARN
  per_loss = {'ce': float(ce.mean()), **{n: float(m.mean()) for n, m in ran.items()}}
  strongest = min(per_loss, key=per_loss.get)
  verdict = (
      'Robust accuracy per loss: ' + ', '.join(f'{n} {_pct(a)}' for n, a in per_loss.items()) +
      f'; worst case {_pct(worst.mean())}; other losses break {_pct(gain)} of the points '
      f'({_pct(broken_share)} of those CE leaves robust; strongest: {strongest})' +
      ''.join(f'; {n} skipped ({why})' for n, why in skipped.items()) + '. ' + {
          PASS: 'The losses agree: no sign of loss-specific masking.',
          WARN: 'CE alone overestimates robustness by a few points (usual for adversarially '
                'trained models, where targeted losses are stronger); the worst case is reported.',
          FAIL: 'CE alone badly overestimates robustness (CE-specific masking, e.g. a '
                'saturated softmax); only the worst case over losses is meaningful.'}[status])
  return _check(5, 'several losses (CE, DLR, targeted DLR, margin)', status, verdict, {
      'robust_accuracy': per_loss, 'worst_case': float(worst.mean()),
      'gain_over_ce': gain, 'broken_share_of_ce_robust': broken_share,
      'skipped': dict(skipped), 'tolerance': tolerance, 'masking_share': MASKING_SHARE})


def check_gradients(logits_fn: Callable[[jax.Array], jax.Array], x, y, *, key: jax.Array,
                    eps: float, norm: str = 'linf', directions: int = 16,
                    batch_size: int = 500, tolerance: float = TOLERANCE) -> dict:
  """Check 6 on images x [N, H, W, C] and int labels y [N]: input-gradient health at every
  point, for the CE and margin losses, and `directions` finite-difference probes per point."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  probe_fn = functools.partial(_gradient_probe, logits_fn=logits_fn, directions=directions)
  probe = _batched(probe_fn, (x, y), batch_size, key)
  return _grade_gradients(probe, eps=eps, norm=norm, tolerance=max(tolerance, 1 / len(x)))


def _grade_gradients(probe: Mapping[str, Any], *, eps: float, norm: str,
                     tolerance: float) -> dict:
  """Check 6's verdict from _gradient_probe's per-example arrays."""
  dual = 'l1' if norm == 'linf' else 'l2'
  numbers: dict[str, Any] = {'tolerance': tolerance, 'fd_step': FD_STEP, 'fd_rtol': FD_RTOL}
  for name in ('ce', 'margin'):
    p = probe[name]
    first_order = eps * p[dual]  # loss change of a full eps step, to first order
    tiny = ~p['zero'] & (first_order < TINY_CHANGE * (1 + np.abs(p['loss'])))
    numbers[name] = {'zero_fraction': float(p['zero'].mean()),
                     'tiny_fraction': float(tiny.mean()),
                     'nonfinite_fraction': float((~p['finite']).mean()),
                     'median_first_order_gain': _finite_or_none(np.median(first_order))}
  d = probe['directional']
  analytic, finite_difference = d['analytic'], d['finite_difference']
  directions = analytic.shape[1]
  floor = FD_ATOL * (1 + np.abs(probe['margin']['loss'])) / FD_STEP * np.sqrt(directions)
  scale = np.maximum(np.maximum(np.linalg.norm(analytic, axis=1),
                                np.linalg.norm(finite_difference, axis=1)), floor)
  relative_error = np.linalg.norm(analytic - finite_difference, axis=1) / scale
  finite = np.isfinite(relative_error)
  numbers['finite_difference'] = {
      'directions': int(directions),
      'disagree_fraction': float((~finite | (relative_error > FD_RTOL)).mean()),
      'median_relative_error': _finite_or_none(np.median(relative_error)),
      'max_relative_error': _finite_or_none(relative_error.max())}
  ce, margin, fd = numbers['ce'], numbers['margin'], numbers['finite_difference']
  nonfinite = max(ce['nonfinite_fraction'], margin['nonfinite_fraction'])
  vanishing = margin['zero_fraction'] + margin['tiny_fraction']
  status = _worst(FAIL if nonfinite > 0 else PASS, _grade(vanishing, tolerance),
                  _grade(fd['disagree_fraction'], tolerance))
  if status == PASS and ce['zero_fraction'] + ce['tiny_fraction'] > tolerance:
    status = WARN  # CE saturates, margin does not: the loss, not the model, hides gradients
  verdict = (
      f'Input gradients of the margin loss are zero at {_pct(margin["zero_fraction"])}, tiny at '
      f'{_pct(margin["tiny_fraction"])} and non-finite at {_pct(margin["nonfinite_fraction"])} '
      f'of the points (CE: {_pct(ce["zero_fraction"])} zero, {_pct(ce["tiny_fraction"])} tiny); '
      f'analytic directional derivatives along {fd["directions"]} random directions disagree '
      f'with finite differences at {_pct(fd["disagree_fraction"])} of the points (relative '
      f'error median {_num(fd["median_relative_error"])}, max {_num(fd["max_relative_error"])}). '
      + {
          PASS: 'Gradients exist, are finite and are correct.',
          WARN: 'Gradients are mostly healthy, but some vanish (CE saturation) or disagree with '
                'finite differences: prefer margin/DLR losses and check the flagged points.',
          FAIL: 'Gradients are zero, non-finite or wrong (shattered / obfuscated gradients, '
                'Athalye et al. 2018): gradient-based robustness numbers are not evidence.'
      }[status])
  return _check(6, 'gradient health', status, verdict, numbers)


def check_noise(whitebox: np.ndarray, noise: np.ndarray, clean_correct: np.ndarray, *,
                draws: int, tolerance: float) -> dict:
  """Check 7. Random noise must not break points that every white-box attack missed."""
  attacked = max(int(clean_correct.sum()), 1)
  noise_success = float((clean_correct & ~noise).sum() / attacked)
  whitebox_success = float((clean_correct & ~whitebox).sum() / attacked)
  only = whitebox & ~noise
  status = _grade(float(only.mean()), tolerance)
  verdict = (
      f'Random noise ({draws} draws per point at distance eps) fools {_pct(noise_success)} of '
      f'the correctly classified points, the white-box attacks {_pct(whitebox_success)}; noise '
      f'breaks {int(only.sum())} point(s) the white-box attacks did not. ' + {
          PASS: 'Gradients are more useful than random search, as they should be.',
          WARN: 'Noise finds a few points gradients miss: the white-box attacks are weak there.',
          FAIL: 'Noise beats gradient attacks: gradients point nowhere useful (masking).'
      }[status])
  return _check(7, 'random noise weaker than white-box', status, verdict, {
      'draws': draws, 'noise_success_rate': noise_success,
      'whitebox_success_rate': whitebox_success, 'noise_only_points': int(only.sum()),
      'tolerance': tolerance})


def check_determinism(apply_fn: Callable, variables: Any, x) -> dict:
  """Check 8 on a batch x: forward passes eager twice and jit once must agree (randomness
  would need EOT), and the first half of the batch alone must give the same logits."""
  x = np.asarray(x, np.float32)
  logits_fn = batching.bind(apply_fn, variables)
  passes = [np.asarray(apply_fn(variables, x)), np.asarray(apply_fn(variables, x)),
            np.asarray(jax.jit(logits_fn)(x))]
  scale = max(float(np.abs(passes[0]).max()), 1e-30)
  half = max(len(x) // 2, 1)
  alone = np.asarray(apply_fn(variables, x[:half]))
  argmax = [p.argmax(-1) for p in passes]
  numbers = {
      'repeat_max_relative_difference': max(float(np.abs(p - passes[0]).max()) / scale
                                            for p in passes[1:]),
      'repeat_prediction_changes': int(sum((a != argmax[0]).sum() for a in argmax[1:])),
      'batch_max_relative_difference': float(np.abs(alone - passes[0][:half]).max()) / scale,
      'batch_prediction_changes': int((alone.argmax(-1) != argmax[0][:half]).sum()),
      'num_examples': int(len(x))}
  repeat = numbers['repeat_max_relative_difference']
  batch = numbers['batch_max_relative_difference']
  status = PASS
  if repeat > REPEAT_RTOL or numbers['repeat_prediction_changes']:
    status = FAIL
  elif batch > BATCH_RTOL or numbers['batch_prediction_changes']:
    status = WARN
  verdict = (
      f'Repeated forward passes (eager twice, jit once) differ by at most {repeat:.3g} '
      f'(relative to the largest logit) with {numbers["repeat_prediction_changes"]} changed '
      f'prediction(s); evaluating half the batch alone changes logits by {batch:.3g} and '
      f'{numbers["batch_prediction_changes"]} prediction(s). ' + {
          PASS: 'Inference is deterministic and independent of the batch: no EOT needed.',
          WARN: 'Outputs depend on which images share the batch (batch statistics at inference?):'
                ' robust accuracy then depends on batching.',
          FAIL: 'Inference is random: attacks need Expectation over Transformation (Athalye et '
                'al. 2018), and single-sample robust accuracy is not evidence.'}[status])
  return _check(8, 'deterministic inference', status, verdict, dict(numbers))


# --------------------------------------------------------------------------------------------
# The entry point.


def _check_inputs(x, y, eps: float, norm: str, budget) -> tuple[np.ndarray, np.ndarray, Budget]:
  core.check_images(x)
  core.check_eps(eps, norm)
  if eps <= 0:
    raise ValueError(f'eps must be > 0 for the checklist, got {eps}.')
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer) or y.shape != x.shape[:1]:
    raise ValueError(f'labels must be integers of shape [{len(x)}], got {y.dtype} {y.shape}.')
  if isinstance(budget, str):
    if budget not in BUDGETS:
      raise ValueError(f'unknown budget {budget!r}: choose one of {sorted(BUDGETS)} or pass a '
                       'checklist.Budget.')
    budget = BUDGETS[budget]
  if budget.restart_steps not in budget.convergence_steps or len(budget.convergence_steps) < 2:
    raise ValueError('Budget.convergence_steps needs >= 2 entries including restart_steps, got '
                     f'{budget.convergence_steps} and restart_steps={budget.restart_steps}.')
  return x, y.astype(np.int32), budget


def run_checklist(apply_fn: Callable, variables: Any, x, y, *, key: jax.Array,
                  eps: float = 8 / 255, out_dir: str | Path,
                  surrogate: tuple[Callable, Any] | None = None,
                  budget: str | Budget = 'default', norm: str = 'linf', batch_size: int = 500,
                  progress: bool = False) -> dict:
  """Runs the eight gradient-masking checks on a model and writes the report.

  Args:
    apply_fn, variables: the model, ``apply_fn(variables, images in [0, 1]) -> logits``
      (``gfa_jax.load_model``'s result).
    x, y: test images [N, H, W, C] in [0, 1] and int labels [N].
    key: PRNG key of every random choice.
    eps: the threat model's radius in `norm` ('linf' or 'l2').
    out_dir: receives checklist.json, checklist.md, eps_sweep.png and convergence.png.
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
  x, y, budget_value = _check_inputs(x, y, eps, norm, budget)
  logits_fn = batching.bind(apply_fn, variables)
  clean_correct = batching.predict(logits_fn, x, batch_size) == y
  if not clean_correct.any():
    raise ValueError('the model classifies none of the examples correctly: there is nothing to '
                     'attack. Check the checkpoint, the labels and the data set.')
  num_classes = int(jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, *x.shape[1:]),
                                                                   jnp.float32)).shape[-1])
  setup = _Setup(logits_fn, x, y, float(eps), norm, clean_correct, num_classes, batch_size,
                 int(jax.random.randint(key, (), 0, 2 ** 31 - 1)), progress)
  b = budget_value
  seconds: dict[str, float] = {}
  at_eps: dict[str, np.ndarray] = {}  # every run's still-robust mask at eps
  tick = time.perf_counter()

  def lap(name):
    nonlocal tick
    now = time.perf_counter()
    seconds[name] = now - tick
    tick = now

  # Checks 1 and 2: FGSM, PGD and APGD-CE over the eps sweep.
  sweep = eps_sweep(setup.eps, norm, x.shape[1:])
  index = int(np.argmin(np.abs(np.asarray(sweep) - setup.eps)))
  apgd_runs, apgd_key = {}, jax.random.fold_in(key, 100)

  def apgd_ce(steps, eps_value=setup.eps, run=0):
    """APGD-CE (mask, trace), memoised: run 0 of an iteration count at an eps is shared by the
    sweep, the convergence check and the restarts; run r > 0 are the extra restarts."""
    if (steps, eps_value, run) not in apgd_runs:
      apgd_runs[steps, eps_value, run] = _apgd_ce_run(
          setup, steps, jax.random.fold_in(apgd_key, run), eps_value)
    return apgd_runs[steps, eps_value, run]

  sweep_masks = {
      'fgsm': _registry_masks(setup, 'fgsm', sweep),
      f'pgd-{b.sweep_pgd_steps}': _registry_masks(setup, 'pgd', sweep,
                                                  {'steps': b.sweep_pgd_steps}),
      f'apgd-ce-{b.sweep_apgd_steps}': np.stack([
          apgd_ce(b.sweep_apgd_steps, e)[0] for e in sweep])}
  at_eps.update({name: m[index] for name, m in sweep_masks.items()})
  grey = np.full((1, *x.shape[1:]), 0.5, np.float32)
  grey_class = int(batching.predict(logits_fn, grey, 1)[0])
  grey_bound = float((clean_correct & (y == grey_class)).mean())
  lap('eps_sweep')

  # Check 4: APGD-CE at growing iteration counts (with loss traces) and with restarts.
  convergence, traces = [], {}
  for steps in b.convergence_steps:
    mask, trace = apgd_ce(steps)
    convergence.append(mask)
    traces[f'{steps} iterations'] = trace
    at_eps[f'apgd-ce-{steps}'] = mask
  runs = [apgd_ce(b.restart_steps, run=r) for r in range(b.restarts)]
  restart_mask = np.logical_and.reduce([m for m, _ in runs])
  traces[f'{b.restarts} restarts x {b.restart_steps}'] = np.max([t for _, t in runs], axis=0)
  at_eps[f'apgd-ce-{b.restart_steps}x{b.restarts}'] = restart_mask
  lap('convergence')

  # Check 5: other losses.
  others, skipped = {}, {}
  if num_classes >= 3:
    others['dlr'] = _registry_masks(setup, 'apgd-dlr', [eps], {'steps': b.loss_steps})[0]
  else:
    skipped['dlr'] = f'needs >= 3 classes, the model has {num_classes}'
  if num_classes >= 4:
    targets = min(b.targets, num_classes - 1)
    others[f'targeted-dlr ({targets} targets)'] = _registry_masks(
        setup, 'apgd-t', [eps], {'steps': b.loss_steps, 'num_targets': targets})[0]
  else:
    skipped['targeted-dlr'] = f'needs >= 4 classes, the model has {num_classes}'
  others['margin'] = _registry_masks(setup, 'apgd', [eps], {'steps': b.loss_steps,
                                                            'loss': 'margin'})[0]
  at_eps.update({f'apgd-{name.split()[0]}': m for name, m in others.items()})
  ce_names = [n for n in at_eps if n.startswith(('fgsm', 'pgd', 'apgd-ce'))]
  ce_mask = np.logical_and.reduce([at_eps[n] for n in ce_names])
  lap('losses')
  whitebox = np.logical_and.reduce(list(at_eps.values()))  # every gradient attack so far

  # Check 3: Square and transfer.
  black_box = {f'square ({b.square_queries} queries)': _registry_masks(
      setup, 'square', [eps], {'n_queries': b.square_queries})[0]}
  transfer_name = f'transfer (pgd-{b.transfer_steps} on surrogate)'
  black_box[transfer_name] = None
  if surrogate is not None:
    surrogate_fn = functools.partial(*surrogate)
    x_adv = core.run_in_batches(pgd, surrogate_fn, x[setup.todo], y[setup.todo],
                           key=jax.random.fold_in(key, 300), batch_size=batch_size, eps=eps,
                           hparams=(('norm', norm), ('steps', b.transfer_steps)))
    black_box[transfer_name] = _still_robust(setup, x_adv, setup.eps)
  lap('black_box')

  # Check 7: random noise.
  noise_fn = functools.partial(_noise_fooled, eps=jnp.float32(eps), logits_fn=logits_fn,
                               norm=norm, draws=b.noise_draws)
  fooled = _batched(noise_fn, (x[setup.todo], y[setup.todo]), batch_size,
                    jax.random.fold_in(key, 400))
  noise_mask = clean_correct.copy()
  noise_mask[setup.todo] = ~fooled
  lap('noise')

  # Check 6: gradients (all points); check 8: determinism.
  gradients = check_gradients(logits_fn, x, y, key=jax.random.fold_in(key, 500), eps=eps,
                              norm=norm, directions=b.fd_directions, batch_size=batch_size)
  lap('gradients')
  determinism = check_determinism(apply_fn, variables, x[:batch_size])
  lap('determinism')

  tol = setup.tolerance
  checks = [
      check_eps_sweep(sweep, sweep_masks, clean_accuracy=float(clean_correct.mean()),
                      chance=1.0 / num_classes, grey_bound=grey_bound, tolerance=tol),
      check_fgsm(sweep, sweep_masks['fgsm'],
                 {n: m for n, m in sweep_masks.items() if n != 'fgsm'}, tolerance=tol),
      check_black_box(whitebox, black_box, tolerance=tol),
      check_convergence(b.convergence_steps, convergence, restart_mask, restarts=b.restarts,
                        restart_steps=b.restart_steps, tolerance=tol),
      check_losses(ce_mask, others, skipped=skipped, tolerance=tol),
      gradients,
      check_noise(whitebox, noise_mask, clean_correct, draws=b.noise_draws, tolerance=tol),
      determinism]

  all_masks = {**at_eps, **{n: m for n, m in black_box.items() if m is not None},
               f'noise ({b.noise_draws} draws)': noise_mask}
  worst = np.logical_and.reduce(list(all_masks.values()))
  counts = {s: sum(c['status'] == s for c in checks) for s in (PASS, WARN, FAIL)}
  report = {
      'eps': setup.eps, 'eps_text': eps_text(setup.eps), 'norm': norm,
      'num_examples': int(len(x)), 'num_classes': num_classes,
      'budget': budget if isinstance(budget, str) else 'custom',
      'budget_settings': dataclasses.asdict(b), 'seed': setup.seed,
      'clean_accuracy': float(clean_correct.mean()),
      'robust_accuracy': float(worst.mean()),
      'attacks': {name: float(m.mean()) for name, m in all_masks.items()},
      'summary': counts, 'checks': checks,
      # Mean over the attacked points of the best CE loss after each iteration (row 0: start).
      'convergence_trace': {name: t.mean(axis=1).tolist() for name, t in traces.items()},
      'clean_correct': clean_correct.tolist(), 'still_robust': worst.tolist(),
      'seconds': seconds}
  report['seconds']['total'] = time.perf_counter() - start
  report['files'] = _write(report, Path(out_dir))
  return report


# --------------------------------------------------------------------------------------------
# Output.


def _write(report: dict, out_dir: Path) -> dict[str, str]:
  """Draws the plots, writes checklist.md and checklist.json (strict JSON, no NaN, written
  atomically); returns {what: file name}."""
  out_dir.mkdir(parents=True, exist_ok=True)
  sweep = report['checks'][0]['numbers']
  curves = {name: (sweep['eps'], [100 * a for a in acc])
            for name, acc in sweep['robust_accuracy'].items()}
  curves['worst case'] = (sweep['eps'], [100 * a for a in sweep['worst_case']])
  plots.plot_lines(
      out_dir / 'eps_sweep.png', curves, logx=True, ylim=(-2, 102),
      xlabel=f'eps ({report["norm"]} radius, images in [0, 1]; log scale)',
      ylabel=f'robust accuracy (%) of {report["num_examples"]} test images',
      title='Check 1/2: robust accuracy must reach 0% (or chance) as eps grows',
      reference_lines={'clean accuracy': 100 * report['clean_accuracy'],
                       'chance': 100 * sweep['chance']})
  traces = {name: (np.arange(1, len(t)), t[1:])
            for name, t in report['convergence_trace'].items()}
  plots.plot_lines(
      out_dir / 'convergence.png', traces, logx=True, markevery=0.1,
      xlabel='APGD-CE iteration (log scale)',
      ylabel='best cross-entropy so far (nats)\nmean over attacked points',
      title=f'Check 4: convergence at eps {report["eps_text"]} ({report["norm"]})')
  files = {'json': 'checklist.json', 'markdown': 'checklist.md',
           'eps_sweep': 'eps_sweep.png', 'convergence': 'convergence.png'}
  write_atomically(out_dir / 'checklist.md', markdown(report, files).encode())
  write_atomically(out_dir / 'checklist.json',
                   json.dumps({**report, 'files': files}, indent=1, allow_nan=False).encode())
  return files


def _md_number(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    return '[' + ', '.join(_md_number(v) for v in value) + ']'
  if isinstance(value, dict):
    return '{' + ', '.join(f'{k}: {_md_number(v)}' for k, v in value.items()) + '}'
  return str(value)


def markdown(report: Mapping[str, Any], files: Mapping[str, str] | None = None) -> str:
  """The report as Markdown: a summary table, then each check's verdict and numbers."""
  s = report['summary']
  lines = [
      '# Gradient-masking checklist', '',
      f'Threat model: {report["norm"]} eps = {report["eps_text"]}; {report["num_examples"]} '
      f'examples, {report["num_classes"]} classes; budget `{report["budget"]}`.', '',
      f'Clean accuracy **{_pct(report["clean_accuracy"])}**; robust accuracy **'
      f'{_pct(report["robust_accuracy"])}** (per-example worst case over '
      f'{len(report["attacks"])} attack runs at eps). Checks: {s[PASS]} PASS, {s[WARN]} WARN, '
      f'{s[FAIL]} FAIL.', '',
      '| # | check | status |', '|---|---|---|']
  lines += [f'| {c["id"]} | {c["name"]} | **{c["status"]}** |' for c in report['checks']]
  lines += ['', '## Robust accuracy at eps per attack run', '', '| attack | robust accuracy |',
            '|---|---|']
  lines += [f'| {name} | {_pct(acc)} |' for name, acc in report['attacks'].items()]
  figures = {1: 'eps_sweep', 4: 'convergence'}
  for c in report['checks']:
    lines += ['', f'## {c["id"]}. {c["name"]}: {c["status"]}', '', c['verdict'], '']
    lines += [f'- {k}: {_md_number(v)}' for k, v in c['numbers'].items()]
    if files and c['id'] in figures:
      lines += ['', f'![{figures[c["id"]]}]({files[figures[c["id"]]]})']
  budget = ', '.join(f'{k}={v}' for k, v in report['budget_settings'].items())
  lines += ['', f'Budget: {budget}. Seed {report["seed"]}.', '']
  return '\n'.join(lines)

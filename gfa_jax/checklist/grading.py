"""The checklist's eight grading rules: pure functions of masks and numbers (no model).

Each takes what the producers (gfa_jax.checklist.producers) measured and returns one check,
{'id', 'name', 'status' (PASS, WARN or FAIL), 'verdict' (a sentence written from the numbers),
'numbers'}, so every rule is testable alone. Thresholds are module constants, documented with
their reasons in docs/checklist.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
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


def eps_text(value: float) -> str:
  """'8/255' for multiples of 1/255, else a short decimal."""
  k = value * 255
  return f"{round(k)}/255" if round(k) > 0 and abs(k - round(k)) < 1e-6 else f"{value:.4g}"


def _pct(fraction: float | None) -> str:
  return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def _num(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2g}"


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
  return {"id": number, "name": name, "status": status, "verdict": verdict, "numbers": numbers}


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
  names = ", ".join(masks)
  end = ("The attacks reach 0%, as they must on any model." if final <= tolerance else
         "The attacks reach chance but not 0%: they are weaker than they should be."
         if final <= chance + tolerance else
         "The attacks cannot break the model even where the threat model allows replacing the "
         "image: they are failing (gradient masking or a bug).")
  if not monotone:
    end += (" Points that survive a larger eps after being broken at a smaller one show the "
            "attacks do not find the best point in the ball.")
  verdict = (
      f"Robust accuracy (per-point worst case of {names}) falls from {_pct(clean_accuracy)} "
      f"clean to {_pct(accuracy[0])} at eps {eps_text(eps_values[0])} and "
      f"{_pct(final)} at eps {eps_text(eps_values[-1])} (chance {_pct(chance)}; the mid-grey "
      f"image, inside every ball of that radius, alone leaves {_pct(grey_bound)}); "
      f"{int(non_monotone.sum())} point(s) survive a larger eps after being broken at a smaller "
      "one. " + end)
  return _check(1, "robust accuracy vs eps reaches 0 / chance", status, verdict, {
      "eps": [float(e) for e in eps_values], "eps_text": [eps_text(e) for e in eps_values],
      "robust_accuracy": {name: m.mean(axis=1).tolist() for name, m in masks.items()},
      "worst_case": accuracy.tolist(), "clean_accuracy": clean_accuracy,
      "chance": chance, "grey_image_bound": grey_bound,
      "non_monotone_points": int(non_monotone.sum()), "tolerance": tolerance})


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
      f"Largest excess of an iterative attack's robust accuracy over FGSM: "
      f"{100 * worst_excess:+.1f} points" +
      (f" (at eps {eps_text(eps_values[at])})" if worst_excess > 0 else "") + '; at most '
      f'{int(missed.sum(axis=1).max())} point(s) at one eps are broken by FGSM but by none of '
      f'{", ".join(iterative)}. ' + {
          PASS: "Iterative attacks are at least as strong as one gradient step everywhere.",
          WARN: "FGSM finds some points the iterative attacks miss: their steps or start are "
                "off for this model (a sign of a rugged or masked loss).",
          FAIL: "A single step beats many iterations: the classic symptom of gradient masking "
                "(Carlini et al. 2019) or a broken attack."}[status])
  return _check(2, "iterative attacks at least as strong as FGSM", status, verdict, {
      "eps": [float(e) for e in eps_values], "fgsm_robust_accuracy": fgsm_acc.tolist(),
      "robust_accuracy": {name: m.mean(axis=1).tolist() for name, m in iterative.items()},
      "excess_over_fgsm": excess, "fgsm_only_points": missed.sum(axis=1).tolist(),
      "tolerance": tolerance})


def check_black_box(whitebox: np.ndarray, black_box: Mapping[str, np.ndarray | None], *,
                    tolerance: float) -> dict:
  """Check 3. No black-box or transfer attack may break points every white-box attack missed.
  A None mask means the attack was not run (WARN, never a silent pass)."""
  numbers: dict[str, Any] = {"whitebox_robust_accuracy": float(whitebox.mean()),
                             "tolerance": tolerance}
  statuses, parts = [], []
  for name, mask in black_box.items():
    if mask is None:
      statuses.append(WARN)
      numbers[name] = None
      parts.append(f"{name}: not run (no surrogate model given)")
      continue
    only = whitebox & ~mask
    statuses.append(_grade(float(only.mean()), tolerance))
    numbers[name] = {"robust_accuracy": float(mask.mean()), "only_points": int(only.sum()),
                     "only_fraction": float(only.mean())}
    parts.append(f"{name} leaves {_pct(mask.mean())} and breaks {int(only.sum())} point(s) "
                 "no white-box attack broke")
  status = _worst(*statuses)
  ran = [n for n, m in black_box.items() if m is not None]
  ran_status = _worst(PASS, *(s for s, m in zip(statuses, black_box.values()) if m is not None))
  if status == PASS:
    conclusion = "Gradients find everything the black-box attacks find."
  elif ran_status == PASS:
    conclusion = ("Gradients find everything the attacks run find, but the comparison is "
                  "incomplete: pass a standard-trained surrogate for the transfer attack.")
  else:
    conclusion = (f'{" / ".join(ran)} succeed where gradients fail: gradient masking (Athalye '
                  'et al. 2018); trust the worst case, not the white-box number.')
  verdict = f"White-box attacks leave {_pct(whitebox.mean())}; " + "; ".join(parts) + ". " + \
      conclusion
  return _check(3, "white-box beats black-box and transfer", status, verdict, numbers)


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
      "APGD-CE robust accuracy with " + ", ".join(f"{s} iterations {_pct(a)}"
                                                  for s, a in zip(steps, accs)) +
      f"; going from {steps[-2]} to {steps[-1]} iterations breaks {_pct(gains[-1])} more of the "
      f"points, {restarts} restarts of {restart_steps} iterations break {_pct(restart_gain)} more "
      f"(tolerance {_pct(tolerance)}). " + {
          PASS: "The attack has converged.",
          WARN: "The attack has not quite converged: more iterations or restarts still help.",
          FAIL: "The attack is far from converged: robust accuracy at smaller budgets "
                "overestimates robustness."}[status])
  return _check(4, "attack convergence (iterations, restarts)", status, verdict, {
      "steps": list(steps), "robust_accuracy": accs, "newly_broken": gains,
      "restarts": restarts, "restart_steps": restart_steps,
      "restarts_robust_accuracy": float(restart_mask.mean()),
      "restarts_newly_broken": restart_gain, "tolerance": tolerance})


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
  per_loss = {"ce": float(ce.mean()), **{n: float(m.mean()) for n, m in ran.items()}}
  strongest = min(per_loss, key=per_loss.get)
  verdict = (
      "Robust accuracy per loss: " + ", ".join(f"{n} {_pct(a)}" for n, a in per_loss.items()) +
      f"; worst case {_pct(worst.mean())}; other losses break {_pct(gain)} of the points "
      f"({_pct(broken_share)} of those CE leaves robust; strongest: {strongest})" +
      "".join(f"; {n} skipped ({why})" for n, why in skipped.items()) + ". " + {
          PASS: "The losses agree: no sign of loss-specific masking.",
          WARN: "CE alone overestimates robustness by a few points (usual for adversarially "
                "trained models, where targeted losses are stronger); the worst case is reported.",
          FAIL: "CE alone badly overestimates robustness (CE-specific masking, e.g. a "
                "saturated softmax); only the worst case over losses is meaningful."}[status])
  return _check(5, "several losses (CE, DLR, targeted DLR, margin)", status, verdict, {
      "robust_accuracy": per_loss, "worst_case": float(worst.mean()),
      "gain_over_ce": gain, "broken_share_of_ce_robust": broken_share,
      "skipped": dict(skipped), "tolerance": tolerance, "masking_share": MASKING_SHARE})


def grade_gradients(probe: Mapping[str, Any], *, eps: float, norm: str,
                     tolerance: float) -> dict:
  """Check 6's verdict from producers.gradient_probe's per-example arrays."""
  dual = "l1" if norm == "linf" else "l2"
  numbers: dict[str, Any] = {"tolerance": tolerance, "fd_step": FD_STEP, "fd_rtol": FD_RTOL}
  for name in ("ce", "margin"):
    p = probe[name]
    first_order = eps * p[dual]  # loss change of a full eps step, to first order
    tiny = ~p["zero"] & (first_order < TINY_CHANGE * (1 + np.abs(p["loss"])))
    numbers[name] = {"zero_fraction": float(p["zero"].mean()),
                     "tiny_fraction": float(tiny.mean()),
                     "nonfinite_fraction": float((~p["finite"]).mean()),
                     "median_first_order_gain": _finite_or_none(np.median(first_order))}
  d = probe["directional"]
  analytic, finite_difference = d["analytic"], d["finite_difference"]
  directions = analytic.shape[1]
  floor = FD_ATOL * (1 + np.abs(probe["margin"]["loss"])) / FD_STEP * np.sqrt(directions)
  scale = np.maximum(np.maximum(np.linalg.norm(analytic, axis=1),
                                np.linalg.norm(finite_difference, axis=1)), floor)
  relative_error = np.linalg.norm(analytic - finite_difference, axis=1) / scale
  finite = np.isfinite(relative_error)
  numbers["finite_difference"] = {
      "directions": int(directions),
      "disagree_fraction": float((~finite | (relative_error > FD_RTOL)).mean()),
      "median_relative_error": _finite_or_none(np.median(relative_error)),
      "max_relative_error": _finite_or_none(relative_error.max())}
  ce, margin, fd = numbers["ce"], numbers["margin"], numbers["finite_difference"]
  nonfinite = max(ce["nonfinite_fraction"], margin["nonfinite_fraction"])
  vanishing = margin["zero_fraction"] + margin["tiny_fraction"]
  status = _worst(FAIL if nonfinite > 0 else PASS, _grade(vanishing, tolerance),
                  _grade(fd["disagree_fraction"], tolerance))
  if status == PASS and ce["zero_fraction"] + ce["tiny_fraction"] > tolerance:
    status = WARN  # CE saturates, margin does not: the loss, not the model, hides gradients
  verdict = (
      f'Input gradients of the margin loss are zero at {_pct(margin["zero_fraction"])}, tiny at '
      f'{_pct(margin["tiny_fraction"])} and non-finite at {_pct(margin["nonfinite_fraction"])} '
      f'of the points (CE: {_pct(ce["zero_fraction"])} zero, {_pct(ce["tiny_fraction"])} tiny); '
      f'analytic directional derivatives along {fd["directions"]} random directions disagree '
      f'with finite differences at {_pct(fd["disagree_fraction"])} of the points (relative '
      f'error median {_num(fd["median_relative_error"])}, max {_num(fd["max_relative_error"])}). '
      + {
          PASS: "Gradients exist, are finite and are correct.",
          WARN: "Gradients are mostly healthy, but some vanish (CE saturation) or disagree with "
                "finite differences: prefer margin/DLR losses and check the flagged points.",
          FAIL: "Gradients are zero, non-finite or wrong (shattered / obfuscated gradients, "
                "Athalye et al. 2018): gradient-based robustness numbers are not evidence."
      }[status])
  return _check(6, "gradient health", status, verdict, numbers)


def check_noise(whitebox: np.ndarray, noise: np.ndarray, clean_correct: np.ndarray, *,
                draws: int, tolerance: float) -> dict:
  """Check 7. Random noise must not break points that every white-box attack missed."""
  attacked = max(int(clean_correct.sum()), 1)
  noise_success = float((clean_correct & ~noise).sum() / attacked)
  whitebox_success = float((clean_correct & ~whitebox).sum() / attacked)
  only = whitebox & ~noise
  status = _grade(float(only.mean()), tolerance)
  verdict = (
      f"Random noise ({draws} draws per point at distance eps) fools {_pct(noise_success)} of "
      f"the correctly classified points, the white-box attacks {_pct(whitebox_success)}; noise "
      f"breaks {int(only.sum())} point(s) the white-box attacks did not. " + {
          PASS: "Gradients are more useful than random search, as they should be.",
          WARN: "Noise finds a few points gradients miss: the white-box attacks are weak there.",
          FAIL: "Noise beats gradient attacks: gradients point nowhere useful (masking)."
      }[status])
  return _check(7, "random noise weaker than white-box", status, verdict, {
      "draws": draws, "noise_success_rate": noise_success,
      "whitebox_success_rate": whitebox_success, "noise_only_points": int(only.sum()),
      "tolerance": tolerance})


def grade_determinism(numbers: Mapping[str, Any]) -> dict:
  """Check 8 from producers.determinism_probe's numbers: repeated passes must agree (FAIL:
  inference is random and needs EOT); half the batch alone must agree (WARN: batch-dependent)."""
  repeat = numbers["repeat_max_relative_difference"]
  batch = numbers["batch_max_relative_difference"]
  status = PASS
  if repeat > REPEAT_RTOL or numbers["repeat_prediction_changes"]:
    status = FAIL
  elif batch > BATCH_RTOL or numbers["batch_prediction_changes"]:
    status = WARN
  verdict = (
      f'Repeated forward passes (eager twice, jit once) differ by at most {repeat:.3g} '
      f'(relative to the largest logit) with {numbers["repeat_prediction_changes"]} changed '
      f'prediction(s); evaluating half the batch alone changes logits by {batch:.3g} and '
      f'{numbers["batch_prediction_changes"]} prediction(s). ' + {
          PASS: "Inference is deterministic and independent of the batch: no EOT needed.",
          WARN: "Outputs depend on which images share the batch (batch statistics at inference?):"
                " robust accuracy then depends on batching.",
          FAIL: "Inference is random: attacks need Expectation over Transformation (Athalye et "
                "al. 2018), and single-sample robust accuracy is not evidence."}[status])
  return _check(8, "deterministic inference", status, verdict, dict(numbers))

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
The reported robust accuracy is the per-example worst case over everything run at eps.

The package: ``producers`` measures (every model call), ``grading`` grades (pure functions of
the numbers, thresholds documented in docs/checklist.md), ``pipeline`` runs the checks over
memoised producers, and gfa_jax.reporting writes checklist.json, checklist.md and the plots.
"""

from gfa_jax.checklist.grading import (FAIL, PASS, WARN, check_black_box, check_convergence,
                                       check_eps_sweep, check_fgsm, check_losses, check_noise,
                                       eps_text, grade_determinism, grade_gradients)
from gfa_jax.checklist.pipeline import STEPS, Runs, run_checklist
from gfa_jax.checklist.producers import (BUDGETS, Budget, check_determinism, check_gradients,
                                         eps_sweep)

__all__ = [
    "BUDGETS", "Budget", "FAIL", "PASS", "Runs", "STEPS", "WARN", "check_black_box",
    "check_convergence", "check_determinism", "check_eps_sweep", "check_fgsm",
    "check_gradients", "check_losses", "check_noise", "eps_sweep", "eps_text",
    "grade_determinism", "grade_gradients", "run_checklist"]

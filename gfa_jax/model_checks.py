"""Checks of the model itself, made before (and beside) any attack: is it collapsed, and do its
logits depend on the input at all.

Exists apart from `evaluate` because both answer a question about the model, not about an
attack: `evaluate` records them in every result (`degenerate`, `model_checks`), the quickstart
reads the first, and `evaluate.degenerate_model` / `evaluate.input_independence` remain the
names callers use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from gfa_jax.attacks import core
from gfa_jax.attacks.autoattack import check_input_independent, check_zero_gradients


def input_independence(logits_fn: Callable, x: np.ndarray, y: np.ndarray,
                       clean_correct: np.ndarray, *, eps: Sequence[float], norm: str,
                       batch_size: int, key: jax.Array) -> list[dict]:
  """AutoAttack's zero-gradient check and our input-independence check
  (``autoattack.check_input_independent``), on the first `batch_size` points classified
  correctly, for every attack; returns the two check records.

  Exists because a collapsed network (every ReLU dead) has logits that no input changes: each
  attack would spend its whole budget (33 minutes of AutoAttack on one such model) to leave
  robust accuracy at clean accuracy. Norms without a random start (l1, l0) probe the whole
  [0, 1] box around each point instead of an eps-ball.
  """
  todo = np.flatnonzero(clean_correct)[:batch_size]
  if not len(todo):
    return [check_input_independent(logits_fn, x[:0], None, 0.0, "linf", zero_gradients=False)]
  zero = check_zero_gradients(logits_fn, x[todo], y[todo])
  probe_norm, probe_eps = (norm, max(eps)) if norm in core.NORMS else ("linf", 1.0)
  independence = check_input_independent(
      logits_fn, x[todo], key, probe_eps, probe_norm,
      zero_gradients=zero["zero_gradient_points"] == len(todo))
  return [zero, independence]


def degenerate_model(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                     share: float = 0.9, min_entropy: float = 0.5,
                     min_z: float = 3.0) -> str | None:
  """A sentence naming how the model is degenerate, else None: its robust accuracy then says
  nothing about robustness, and reports must say so instead of scoring it.

  Exists because a collapsed GFA model is not always a constant one (docs/results.md): the
  quickstart's GFA-DEEP model predicts 2 of 10 classes at 14 % accuracy. Three signs, any one
  suffices:
  - one class takes >= `share` of the predictions;
  - few classes: the entropy of the predicted-class histogram, as a fraction of its maximum
    log(num_classes), is below `min_entropy` (0.5 of 10 classes is 3.2 effective classes;
    a weak but honest model predicting every class is near 0.9). Needs >= num_classes inputs;
  - accuracy within sampling noise of chance: fewer than `min_z` binomial standard errors
    above the accuracy predictions independent of the image would score with the same
    histograms (sum over classes of predicted share x label share; 1/num_classes for
    balanced labels), with len(predictions) examples.
  "collapsed" names the first two, "at chance" the third alone.
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  n = len(predictions)
  if not n:
    return None
  shares = np.bincount(predictions, minlength=num_classes) / n
  used = shares[shares > 0]
  entropy = max(0.0, float(-(used * np.log(used)).sum()))  # nats; exp: effective classes
  relative_entropy = entropy / np.log(num_classes) if num_classes > 1 else 0.0
  chance = float(shares @ (np.bincount(labels, minlength=num_classes)[:num_classes] / n))
  accuracy = float(np.mean(predictions == labels))
  spread = np.sqrt(chance * (1 - chance) / n)
  z = (accuracy - chance) / spread if spread else (np.inf if accuracy > chance else 0.0)
  one = bool(shares.max() >= share)
  few = bool(n >= num_classes and relative_entropy < min_entropy)
  signs = ([f"one class >= {100 * share:.0f} % of inputs"] * one
           + [f"few classes (entropy {relative_entropy:.2f} of its max < {min_entropy:g})"] * few
           + [f"accuracy at chance (z < {min_z:g})"] * bool(z < min_z))
  if not signs:
    return None
  order = np.argsort(-shares, kind="stable")  # the top class, then others with >= 5 %
  main = [f"class {c} for {100 * shares[c]:.0f} %" for c in order[:3]
          if c == order[0] or shares[c] >= 0.05]
  kind = "collapsed" if one or few else "at chance"
  return (f'{kind}: predicts {main[0]} of inputs{"".join(", " + m for m in main[1:])} '
          f"({len(used)} of {num_classes} classes, {np.exp(entropy):.1f} effective); clean "
          f"accuracy {100 * accuracy:.1f} % on {n} examples, chance {100 * chance:.1f} % "
          f'(z = {z:.1f}); signs: {"; ".join(signs)}. Its robust accuracy says nothing about '
          'robustness (docs/results.md, "collapse")')

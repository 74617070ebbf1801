"""DeepFool (Moosavi-Dezfooli et al., 2016): minimal l2 / linf adversarial examples.

Each step linearises the logit differences z_c - z_y around the current point, picks the class c
whose linearised boundary is nearest, and jumps onto it; the total perturbation is scaled by
(1 + overshoot) so the last jump lands just past the boundary. Defaults follow foolbox 3's
L2DeepFoolAttack / LinfDeepFoolAttack (steps 50, candidates 10, overshoot 0.02, loss 'logits').
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gfa_jax.attacks import core

# Norm used to measure a linearised distance |f| / ||g||_dual when stepping in `norm`.
DUAL_NORM = {"linf": "l1", "l2": "l2"}


def class_difference_grads(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                           y: jax.Array, classes: jax.Array,
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits and the values and input gradients of z_c - z_y for several classes c per example.

  Args:
    logits_fn: images -> logits [B, K].
    x: images [B, H, W, C].
    y: labels [B].
    classes: int [B, M], the classes c to compare against y.

  Returns:
    (logits [B, K], diffs [B, M] = z_c - z_y, grads [B, M, H, W, C] = d(z_c - z_y)/dx).

  One forward pass and M backward passes (a vjp vmapped over M cotangents). Examples do not
  interact (inference mode), so the gradient of the batch sum w.r.t. x[i] is example i's own.
  DeepFool and FAB both need these linearisations of the decision boundaries.
  """
  logits, vjp_fn = jax.vjp(logits_fn, x)
  num_classes = logits.shape[-1]
  y_onehot = jax.nn.one_hot(y, num_classes, dtype=logits.dtype)

  def grad_of_difference(c):
    (grad,) = vjp_fn(jax.nn.one_hot(c, num_classes, dtype=logits.dtype) - y_onehot)
    return grad

  grads = jax.vmap(grad_of_difference, in_axes=1, out_axes=1)(classes)
  true_logit = jnp.take_along_axis(logits, y[:, None], axis=1)
  diffs = jnp.take_along_axis(logits, classes, axis=1) - true_logit
  return logits, diffs, grads


def per_class_norm(grads: jax.Array, norm: str) -> jax.Array:
  """Norm of each [H, W, C] slice of grads [B, M, H, W, C], shape [B, M]."""
  batch, num = grads.shape[:2]
  return core.lp_norm(grads.reshape(batch * num, -1), norm).reshape(batch, num)


def deepfool(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
             key: jax.Array | None = None, norm: str = "l2", steps: int = 50,
             overshoot: float = 0.02, num_classes_considered: int = 10) -> jax.Array:
  """DeepFool on logits; returns the adversarial images [B, H, W, C] in [0, 1].

  Args:
    logits_fn: images in [0, 1] -> logits [B, K] (logits, never softmax outputs).
    x: clean images [B, H, W, C] in [0, 1].
    y: int labels [B].
    key: unused (DeepFool is deterministic); accepted for the common attack signature.
    norm: 'l2' or 'linf', the norm whose minimal perturbation DeepFool approximates.
    steps: maximum number of linearise-and-jump steps (foolbox: 50).
    overshoot: the accumulated perturbation is scaled by 1 + overshoot (foolbox: 0.02).
    num_classes_considered: the true class and the num_classes_considered - 1 other classes
      with the largest clean logits are candidates (foolbox `candidates=10`), which bounds the
      backward passes per step.

  Returns x itself for examples DeepFool fails to fool within `steps` (and for examples already
  misclassified, whose minimal perturbation is zero), so every returned non-clean point is
  misclassified and its norm is an upper bound on the minimal adversarial norm.
  """
  del key
  core.check_images(x)
  if norm not in core.NORMS:
    raise ValueError(f"DeepFool supports norm in {list(core.NORMS)}, got {norm!r}.")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if overshoot < 0:
    raise ValueError(f"overshoot must be >= 0, got {overshoot}.")
  if num_classes_considered < 2:
    raise ValueError(f"num_classes_considered must be >= 2 (the true class and at least one "
                     f"other), got {num_classes_considered}.")
  x = jax.lax.stop_gradient(x)
  y = y.astype(jnp.int32)
  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  num_candidates = min(num_classes_considered, num_classes) - 1
  # Candidates are fixed at the clean point, as in foolbox: the runners-up are the classes whose
  # boundaries are likely nearest.
  not_true = jnp.where(jax.nn.one_hot(y, num_classes, dtype=jnp.bool_), -jnp.inf, clean_logits)
  _, candidates = jax.lax.top_k(not_true, num_candidates)
  expand = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))

  def step(state):
    i, x_adv, p_total, _ = state
    logits, diffs, grads = class_difference_grads(logits_fn, x_adv, y, candidates)
    active = jnp.argmax(logits, axis=-1) == y  # examples already fooled stay where they are
    distances = jnp.abs(diffs) / (per_class_norm(grads, DUAL_NORM[norm]) + 1e-8)
    nearest = jnp.argmin(distances, axis=1)
    # + 1e-4 (foolbox) guarantees progress when a boundary is reached exactly.
    distance = jnp.take_along_axis(distances, nearest[:, None], axis=1)[:, 0] + 1e-4
    grad = jnp.take_along_axis(grads, expand(nearest)[:, None], axis=1)[:, 0]
    if norm == "l2":
      p_step = expand(distance / (core.lp_norm(grad, "l2") + 1e-8)) * grad
    else:
      p_step = expand(distance) * jnp.sign(grad)
    p_total = p_total + jnp.where(expand(active), p_step, 0.0)
    x_new = jnp.clip(x + (1.0 + overshoot) * p_total, 0.0, 1.0)
    x_adv = jnp.where(expand(active), x_new, x_adv)
    return i + 1, x_adv, p_total, active

  def not_done(state):
    i, _, _, active = state
    return (i < steps) & jnp.any(active)

  batch = x.shape[0]
  init = (0, x, jnp.zeros_like(x), jnp.ones((batch,), jnp.bool_))
  _, x_adv, _, _ = jax.lax.while_loop(not_done, step, init)
  fooled = core.misclassified(logits_fn(x_adv), y)
  return jax.lax.stop_gradient(jnp.where(expand(fooled), x_adv, x))

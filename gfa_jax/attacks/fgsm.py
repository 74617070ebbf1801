"""Fast gradient sign method (Goodfellow et al., 2015) and its l2 analogue (fast gradient method)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from gfa_jax.attacks import core


def fgsm(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
         key: jax.Array | None = None, eps: core.Eps, norm: str = "linf",
         loss: str | core.LossFn = "ce") -> jax.Array:
  """One full-size gradient step: x + eps * sign(g) (linf) or x + eps * g / ||g||_2 (l2).

  g is the gradient of `loss` at the clean x; the result is clipped into [0, 1] and so lies within
  eps. `key` is unused (FGSM is deterministic) and accepted for the common attack signature.
  Returns adversarial images [B, H, W, C].
  """
  del key
  core.check_images(x)
  core.check_eps(eps, norm, x=x)
  core.check_labels(logits_fn, x, y, loss)
  _, _, grad = core.loss_and_grad(logits_fn, core.resolve_loss(loss))(x, y)
  step = core.batch_broadcast(eps, x) * core.steepest_ascent_direction(grad, norm)
  return jax.lax.stop_gradient(core.project(x + step, x, eps, norm))

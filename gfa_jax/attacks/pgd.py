"""Projected gradient descent (Madry et al., 2018), for evaluation and adversarial training."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import jax.numpy as jnp

from gfa_jax.attacks import core


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
        key: jax.Array, eps: core.Eps, norm: str = "linf", steps: int = 10,
        step_size: core.Eps | None = None, loss: str | core.LossFn = "ce",
        random_start: bool = True, x_init: jax.Array | None = None,
        keep_best: bool = True) -> jax.Array:
  """Untargeted PGD in linf or l2; returns adversarial images [B, H, W, C] within eps, in [0, 1].

  Args:
    logits_fn: images in [0, 1] -> logits [B, K].
    x: clean images [B, H, W, C] in [0, 1].
    y: int labels [B], or whatever a callable `loss` takes as its second argument.
    key: PRNG key for the random start.
    eps: radius (scalar or per-example [B]).
    norm: 'linf' (signed-gradient steps) or 'l2' (normalised-gradient steps).
    steps: number of gradient steps.
    step_size: defaults to 2.5 * eps / steps (Madry et al.), so `steps` steps can cross the ball.
    loss: 'ce', 'dlr', 'margin' or a callable (logits, y) -> [B] to maximise.
    random_start: start uniformly in the ball (ignored when x_init is given).
    x_init: explicit start point (projected into the ball), e.g. TRADES' x + 0.001 * normal.
    keep_best: return, per example, the best of the start and the `steps` iterates (a fooling
      point beats a non-fooling one, then higher loss wins); False returns the last iterate, the
      usual choice inside adversarial training (one forward pass cheaper).

  The result carries no gradient (stop_gradient): adversarial training treats it as data.
  """
  core.check_images(x)
  core.check_eps(eps, norm, x=x)
  core.check_labels(logits_fn, x, y, loss)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
  loss_fn = core.resolve_loss(loss)
  value_and_grad = core.loss_and_grad(logits_fn, loss_fn)
  x = jax.lax.stop_gradient(x)
  if step_size is None:
    step_size = 2.5 * jnp.asarray(eps, x.dtype) / max(steps, 1)
  step_b = core.batch_broadcast(step_size, x)

  if x_init is not None:
    x_adv = core.project(x_init, x, eps, norm)
  elif random_start:
    x_adv = core.random_init(key, x, eps, norm)
  else:
    x_adv = x

  def update_best(x_adv, loss_val, logits, best):
    best_x, best_loss, best_fooled = best
    fooled = core.misclassified(logits, y)
    better = core.is_better(loss_val, fooled, best_loss, best_fooled)
    best_x = jnp.where(core.batch_broadcast(better, x), x_adv, best_x)
    return (best_x, jnp.where(better, loss_val, best_loss), best_fooled | fooled)

  def body(_, carry):
    x_adv, best = carry
    loss_val, logits, grad = value_and_grad(x_adv, y)
    if keep_best:
      best = update_best(x_adv, loss_val, logits, best)
    x_adv = core.project(x_adv + step_b * core.steepest_ascent_direction(grad, norm),
                         x, eps, norm)
    return x_adv, best

  batch = x.shape[0]
  best = (x_adv, jnp.full((batch,), -jnp.inf, jnp.float32), jnp.zeros((batch,), jnp.bool_))
  x_adv, best = jax.lax.fori_loop(0, steps, body, (x_adv, best))
  if keep_best:
    logits = logits_fn(x_adv)
    x_adv, _, _ = update_best(x_adv, loss_fn(logits, y), logits, best)
  return jax.lax.stop_gradient(x_adv)

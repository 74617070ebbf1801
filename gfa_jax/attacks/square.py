"""Square Attack (Andriushchenko et al., ECCV 2020): score-based black-box random search.

Follows AutoAttack's reference implementation (fra31/auto-attack, autoattack/square.py): margin
loss, side of the square from p_init = 0.8 with the piecewise-constant halving schedule, linf
start from random vertical stripes, l2 start from a 5x5 grid of "eta" blocks, and only points that
are still classified correctly take new proposals. The model is only ever *queried* (forward
passes, no gradients), so the attack is immune to masked or zero gradients.

Differences from the reference, all deliberate:
- square positions, colours and the eta orientation are drawn per example, each example from its
  own key stream (the reference draws one position per batch); the original authors' code
  (max-andr/square-attack) also draws them per example, and own streams make batch composition
  irrelevant to each example's search, which is what lets the search query only the points
  still robust (`compact`) without changing any result.
- the query budget counts the starting point: at most `n_queries` forward passes per example
  (the reference spends n_queries + 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax.attacks import core

# Iteration thresholds after which p halves again (reference p_selection, on a 10,000 scale).
_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
LOSSES = ("margin", "ce")


def p_schedule(i: jax.Array, n_queries: int, p_init: float, rescale: bool) -> jax.Array:
  """Fraction of pixels the square covers at iteration i (the reference's p_selection).

  p = p_init / 2**k, with k the number of thresholds (10, 50, ..., 8000) the iteration has
  passed. With `rescale` the iteration is first mapped onto the reference's 10,000-query scale,
  so shorter runs still go through the whole schedule.
  """
  i = jnp.asarray(i, jnp.float32)
  it = jnp.floor(i / n_queries * 10000.0) if rescale else i
  halvings = jnp.sum(it > jnp.asarray(_P_THRESHOLDS, jnp.float32))
  return p_init / 2.0 ** halvings


def _side(p: jax.Array, h: int, w: int, minimum: int) -> jax.Array:
  """Square side round(sqrt(p * h * w)), at least `minimum`, at most min(h, w)."""
  s = jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32)
  return jnp.clip(s, minimum, min(h, w))


def _corner(key: jax.Array, batch: int, size: int, s: jax.Array) -> jax.Array:
  """Per-example top/left corner in [0, size - s) (0 when s == size), as the reference's
  random_int(0, size - s)."""
  u = jax.random.uniform(key, (batch,))
  return jnp.floor(u * (size - s)).astype(jnp.int32)


def _window(top: jax.Array, left: jax.Array, s: jax.Array, h: int, w: int):
  """Relative coordinates (rows, cols) [B, H, W] of each pixel w.r.t. the per-example corner,
  and the bool mask [B, H, W] of the s x s window."""
  rows = jnp.arange(h)[None, :, None] - top[:, None, None]
  cols = jnp.arange(w)[None, None, :] - left[:, None, None]
  inside = (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)
  return rows, cols, jnp.broadcast_to(inside, (top.shape[0], h, w))


def _eta(rows: jax.Array, cols: jax.Array, inside: jax.Array, s: jax.Array,
         transpose: jax.Array) -> jax.Array:
  """The reference's eta(s) block placed on the image grid: [B, H, W], zero outside the window.

  The s x s block is two stacked halves of concentric rectangles, weights sum_{k >= d} 1/(k+1)^2
  at Chebyshev distance d from the half's centre, upper half positive, lower half negative, each
  half of unit l2 norm, the whole of unit l2 norm. Written in closed form so that s can be a
  traced value (it shrinks with the schedule inside the loop). `transpose` [B] flips the block
  (the reference's random permute).
  """
  t = transpose[:, None, None]
  rows, cols = jnp.where(t, cols, rows), jnp.where(t, rows, cols)
  s = jnp.asarray(s)
  half = s // 2
  upper = rows < half
  half_rows = jnp.where(upper, half, s - half)
  local_rows = jnp.where(upper, rows, rows - half)
  distance = jnp.maximum(jnp.abs(local_rows - half_rows // 2), jnp.abs(cols - s // 2))
  # partial sums of 1/k^2: weight(d) = H[m] - H[d] with m = s // 2 + 1 rectangles.
  size = int(rows.shape[1] + rows.shape[2] + 2)
  partial = jnp.concatenate([jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, size) ** 2)])
  distance = jnp.clip(distance, 0, size - 1)
  weight = partial[jnp.clip(half + 1, 0, size - 1)] - partial[distance]
  weight = jnp.where(inside, weight, 0.0)

  def unit(part):
    norm = jnp.sqrt(jnp.sum(part ** 2, axis=(1, 2), keepdims=True))
    return part / jnp.maximum(norm, 1e-12)

  block = unit(jnp.where(upper, weight, 0.0)) - unit(jnp.where(upper, 0.0, weight))
  return block / np.sqrt(2.0)


def _signs(key: jax.Array, shape) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


def _margin_and_loss(logits: jax.Array, y: jax.Array, loss: str):
  """(margin, loss) to MINIMISE, as the reference: margin = z_y - max_{i!=y} z_i (<= 0 means
  misclassified); loss is the margin or minus the cross-entropy."""
  margin = -core.margin_loss(logits, y)
  return margin, (margin if loss == "margin" else -core.ce_loss(logits, y))


def _linf_init(key, x, eps):
  """Vertical stripes: one random sign per (example, column, channel), x + eps * sign."""
  b, _, w, c = x.shape
  return jnp.clip(x + eps * _signs(key, (b, 1, w, c)), 0.0, 1.0)


def _linf_proposal(key, i, x, x_best, eps, n_queries, p_init, rescale):
  """x_best with one random square set to a random vertex of the cube (per channel)."""
  b, h, w, c = x.shape
  key_h, key_w, key_sign = jax.random.split(key, 3)
  s = _side(p_schedule(i, n_queries, p_init, rescale), h, w, 1)
  _, _, inside = _window(_corner(key_h, b, h, s), _corner(key_w, b, w, s), s, h, w)
  delta = inside[..., None] * (2.0 * eps) * _signs(key_sign, (b, 1, 1, c))
  x_new = jnp.clip(x_best + delta, x - eps, x + eps)
  return jnp.clip(x_new, 0.0, 1.0)


def _l2_normalize(delta, eps):
  norm = core.lp_norm(delta, "l2").reshape(-1, 1, 1, 1)
  return delta / (norm + 1e-12) * eps


def _l2_init(key, x, eps):
  """A grid of (h // 5)-sized eta blocks with random signs per (example, block, channel)."""
  b, h, w, c = x.shape
  s = max(h // 5, 1)
  start = (h - 5 * s) // 2
  rows, cols = np.arange(h), np.arange(w)
  block_rows, block_cols = (rows - start) // s, (cols - start) // s
  valid_rows = (rows >= start) & (block_rows < h // s)
  valid_cols = (cols >= start) & (block_cols < w // s)
  inside = jnp.asarray(valid_rows[:, None] & valid_cols[None, :])
  rel_rows = jnp.asarray(np.broadcast_to(((rows - start) % s)[:, None], (h, w)))
  rel_cols = jnp.asarray(np.broadcast_to(((cols - start) % s)[None, :], (h, w)))
  key_sign, key_t = jax.random.split(key)
  n_rows, n_cols = h // s, w // s
  signs = _signs(key_sign, (b, n_rows, n_cols, c))
  transpose = jax.random.bernoulli(key_t, 0.5, (b, n_rows, n_cols))
  # Every block is the same eta(s) pattern or its transpose: build one, index it per pixel.
  block = jnp.arange(s)
  one = _eta(jnp.broadcast_to(block[None, :, None], (1, s, s)),
             jnp.broadcast_to(block[None, None, :], (1, s, s)), jnp.ones((1, s, s), bool), s,
             jnp.zeros((1,), bool))[0]
  one_t = one.T
  gather_r = np.clip(block_rows, 0, n_rows - 1)
  gather_c = np.clip(block_cols, 0, n_cols - 1)
  pick_t = transpose[:, gather_r][:, :, gather_c]  # [B, H, W]
  pattern = jnp.where(pick_t, one_t[rel_rows, rel_cols], one[rel_rows, rel_cols])
  pixel_signs = signs[:, gather_r][:, :, gather_c]  # [B, H, W, C]
  delta = jnp.where(inside[None, :, :, None], pattern[..., None] * pixel_signs, 0.0)
  return jnp.clip(x + _l2_normalize(delta, eps), 0.0, 1.0)


def _l2_proposal(key, i, x, x_best, eps, n_queries, p_init, rescale):
  """The reference's l2 update: move the mass of a second square into a first one, re-drawn as
  old content plus a signed eta block, keeping ||delta||_2 = eps."""
  b, h, w, c = x.shape
  key_1h, key_1w, key_2h, key_2w, key_sign, key_t = jax.random.split(key, 6)
  s = _side(p_schedule(i, n_queries, p_init, rescale), h, w, 3)
  s = jnp.where(s % 2 == 0, s + 1, s)
  s = jnp.where(s > min(h, w), s - 2, s)  # stay odd and inside the image
  delta = x_best - x
  rows, cols, in_1 = _window(_corner(key_1h, b, h, s), _corner(key_1w, b, w, s), s, h, w)
  _, _, in_2 = _window(_corner(key_2h, b, h, s), _corner(key_2w, b, w, s), s, h, w)
  in_1, in_2 = in_1[..., None], in_2[..., None]

  def channel_norm(v):  # per (example, channel) over the spatial axes, [B, 1, 1, C]
    return jnp.sqrt(jnp.sum(v ** 2, axis=(1, 2), keepdims=True))

  old = jnp.where(in_1, delta, 0.0)
  norm_image = core.lp_norm(delta, "l2").reshape(-1, 1, 1, 1)
  norm_windows = core.lp_norm(jnp.where(in_1 | in_2, delta, 0.0), "l2").reshape(-1, 1, 1, 1)
  eta = _eta(rows, cols, in_1[..., 0], s, jax.random.bernoulli(key_t, 0.5, (b,)))
  new = eta[..., None] * _signs(key_sign, (b, 1, 1, c)) + old / (1e-12 + channel_norm(old))
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
  new = new / (1e-12 + channel_norm(new)) * budget
  delta = jnp.where(in_1, new, jnp.where(in_2, 0.0, delta))
  return jnp.clip(x + _l2_normalize(delta, eps), 0.0, 1.0)


def _per_example(fn):
  """fn(key, x, ...) of batch-first arrays, run as one example at a time (vmap): each example's
  draws then come from its own key, whatever rows it shares a slice with."""
  return jax.vmap(lambda key, *rows: fn(key, *(r[None] for r in rows))[0])


def _single_run(logits_fn, x, y, key, eps, norm, n_queries, p_init, loss, rescale, robust,
                compact):
  """One random search on the points where `robust` [B] is True; returns (x_best [B,H,W,C],
  margin_min [B]); the other points keep x with margin -1 (already fooled) and cost nothing
  after the first query."""
  init, proposal = (_linf_init, _linf_proposal) if norm == "linf" else (_l2_init, _l2_proposal)
  key_init, key = jax.random.split(key)
  keys = jax.random.split(key, x.shape[0])  # one stream of proposals per example
  eps = jnp.broadcast_to(eps, (x.shape[0],) + (1,) * (x.ndim - 1))
  x_best = _per_example(init)(jax.random.split(key_init, x.shape[0]), x, eps)
  margin_min, loss_min = _margin_and_loss(logits_fn(x_best), y, loss)
  margin_min = jnp.where(robust, margin_min, -1.0)
  x_best = jnp.where(robust[:, None, None, None], x_best, x)

  def step(i, rows, consts):
    """One query for each of `rows`; accepts for the points still robust only."""
    x_best, margin_min, loss_min = rows
    x, y, keys, eps = consts
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    x_new = _per_example(lambda k, x, xb, e: proposal(k, i, x, xb, e, n_queries, p_init,
                                                      rescale))(step_keys, x, x_best, eps)
    margin, loss_new = _margin_and_loss(logits_fn(x_new), y, loss)
    still_robust = margin_min > 0  # points already fooled keep their adversarial example
    lower_loss = still_robust & (loss_new < loss_min)
    accept = lower_loss | (still_robust & (margin <= 0))
    loss_min = jnp.where(lower_loss, loss_new, loss_min)
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    return x_best, margin_min, loss_min

  def cond(state):
    i, _, margin_min, _ = state
    return (i < n_queries - 1) & jnp.any(margin_min > 0)

  def body(state):
    i, *rows = state
    rows, consts = tuple(rows), (x, y, keys, eps)
    if compact:  # query only the points still robust (the reference's idx_to_fool)
      rows = core.on_active_rows(functools.partial(step, i), rows[1] > 0, rows, consts)
    else:
      rows = step(i, rows, consts)
    return (i + 1, *rows)

  state = (jnp.zeros((), jnp.int32), x_best, margin_min, loss_min)
  _, x_best, margin_min, _ = jax.lax.while_loop(cond, body, state)
  return x_best, margin_min


def square(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
           key: jax.Array, eps: core.Eps, norm: str = "linf", n_queries: int = 5000,
           p_init: float = 0.8, loss: str = "margin", rescale_schedule: bool = True,
           n_restarts: int = 1, compact: bool = True) -> jax.Array:
  """Untargeted Square Attack; returns adversarial images [B, H, W, C] within eps, in [0, 1].

  Args:
    logits_fn: images in [0, 1] -> logits [B, K]; only forward passes are used.
    x: clean images [B, H, W, C] in [0, 1].
    y: int labels [B].
    key: PRNG key (starting point and every proposal).
    eps: radius, scalar (may be traced).
    norm: 'linf' or 'l2'.
    n_queries: forward passes per example and restart, counting the starting point.
    p_init: initial fraction of pixels covered by the square (reference default 0.8).
    loss: 'margin' (reference default) or 'ce'.
    rescale_schedule: stretch the p schedule (defined for 10,000 queries) over n_queries, the
      reference's default (AutoAttack's standard run sets it False with 5,000 queries).
    n_restarts: independent searches; a restart searches only the points every earlier one
      left robust (as the reference); per example the lowest margin is kept.
    compact: query only the points still robust, in the smallest power-of-two slice that holds
      them (`core.on_active_rows`). The result is the same as without (each example draws
      from its own key); False queries the whole batch at every step, for a model whose
      outputs depend on the batch's composition.

  Per example the returned point is the first fooling one found, otherwise the lowest-loss one.
  The search stops as soon as every example is misclassified.
  """
  core.check_images(x)
  core.check_eps(eps, norm)
  if n_queries < 1:
    raise ValueError(f"n_queries must be >= 1, got {n_queries}.")
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f"p_init must be in (0, 1], got {p_init}.")
  if loss not in LOSSES:
    raise ValueError(f"Square supports loss in {LOSSES}, got {loss!r}.")
  if n_restarts < 1:
    raise ValueError(f"n_restarts must be >= 1, got {n_restarts}.")
  x = jax.lax.stop_gradient(x)
  eps = core.batch_broadcast(eps, x)  # scalar or per-example [B] -> broadcastable to x
  best_x, best_margin = x, jnp.full(x.shape[:1], jnp.inf, jnp.float32)
  for restart in range(n_restarts):
    x_run, margin = _single_run(logits_fn, x, y, jax.random.fold_in(key, restart), eps, norm,
                                n_queries, p_init, loss, rescale_schedule, best_margin > 0,
                                compact)
    better = (best_margin > 0) & (margin < best_margin)
    best_x = jnp.where(better[:, None, None, None], x_run, best_x)
    best_margin = jnp.where(better, margin, best_margin)
  return best_x

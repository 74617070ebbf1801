"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, 2020), untargeted and targeted (FAB-T).

Each step linearises the classifier at the current point x1, picks the nearest linearised decision
hyperplane, and projects onto that hyperplane intersected with the [0, 1] box both x1 and the
clean x. The next point mixes the two projections, leaning towards the clean image (weight alpha,
at most alpha_max) so that the iterates stay close to x, and overshoots by eta. Whenever an
iterate fools the model it is recorded if it is the smallest so far and pulled back towards x by
beta. Follows autoattack/fab_pt.py and fab_projections.py (fra31/auto-attack); defaults are
theirs: 100 iterations, alpha_max 0.1, eta 1.05, beta 0.9, 9 target classes for FAB-T.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gfa_jax.attacks import core
from gfa_jax.attacks.deepfool import DUAL_NORM, class_difference_grads, per_class_norm

# Radius of the random restarts when no eps is given (fab_pt.py's DEFAULT_EPS_DICT_BY_NORM).
DEFAULT_RESTART_EPS = {"linf": 0.3, "l2": 1.0}
# Stands in for an infinite breakpoint / step length; finite so that 0 * _FAR = 0.
_FAR = 1e12


def project_onto_hyperplane_in_box(t: jax.Array, w: jax.Array, b: jax.Array,
                                   norm: str) -> jax.Array:
  """Smallest step d (in linf or l2) with <w, t + d> = b and t + d in [0, 1]^D, per row.

  Args:
    t: points [N, D] in [0, 1].
    w: hyperplane normals [N, D].
    b: offsets [N].
    norm: 'linf' or 'l2'.

  Returns d [N, D]. Where the hyperplane misses the box, d moves every coordinate to the face of
  the box that brings <w, t + d> closest to b (as fab_projections.py does).

  Moving coordinate i by sign(w_i) * min(lam * rate_i, room_i) is optimal for some lam >= 0
  (rate_i = 1 for linf, |w_i| for l2; room_i = distance to the helpful face of the box), so the
  achieved change g(lam) of <w, t> is piecewise linear and nondecreasing, with a breakpoint
  where each coordinate hits the box. The reference sorts the breakpoints (O(D log D) a row);
  here a bisection on the bits of the float32 lam (non-negative floats order like their int32
  bit patterns, so 31 halvings reach adjacent floats at any scale) brackets the first lam with
  g(lam) >= |gap|, and lam is then solved exactly on that linear segment. Same result, no sort:
  XLA CPU's sort made this projection 4x the cost of FAB's forward and backward pass.
  """
  gap = b - jnp.sum(w * t, axis=1)
  # Orient every hyperplane so that <w, t> has to increase.
  orientation = jnp.where(gap >= 0, 1.0, -1.0)[:, None]
  w = w * orientation
  gap = jnp.abs(gap)
  abs_w = jnp.abs(w)
  room = jnp.where(w > 0, 1.0 - t, t)
  rate = abs_w if norm == "l2" else jnp.ones_like(w)
  breaks = jnp.where(rate > 0, jnp.minimum(room / jnp.where(rate > 0, rate, 1.0), _FAR), _FAR)
  saturated_gain = abs_w * room  # what coordinate i adds once it sits on the box face

  def reaches(lam_bits):  # g(lam) >= gap, per row
    lam = jax.lax.bitcast_convert_type(lam_bits, jnp.float32)[:, None]
    return jnp.sum(jnp.minimum(lam * rate, room) * abs_w, axis=1) >= gap

  def halve(_, bracket):
    lo, hi = bracket  # g(lo) < gap <= g(hi), as bit patterns
    mid = lo + (hi - lo) // 2
    up = reaches(mid)
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  far = jax.lax.bitcast_convert_type(jnp.float32(_FAR), jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(gap, jnp.int32),
                                           jnp.full(gap.shape, far, jnp.int32)))
  lo = jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]
  # On (lo, hi] the coordinates with a breakpoint <= lo are on the box, the others still move.
  on_box = breaks <= lo
  lam = ((gap - jnp.sum(jnp.where(on_box, saturated_gain, 0.0), axis=1))
         / jnp.maximum(jnp.sum(jnp.where(on_box, 0.0, abs_w * rate), axis=1), 1e-30))
  # g(0) = 0 >= gap: no move. g(_FAR) < gap: the hyperplane misses the box, go to the corner.
  feasible = jnp.sum(saturated_gain, axis=1) >= gap
  lam = jnp.where(gap <= 0, 0.0, jnp.where(feasible, jnp.maximum(lam, 0.0), _FAR))[:, None]
  # d is the same vector for the oriented hyperplane (w, b) -> (-w, -b); no flip back.
  return jnp.sign(w) * jnp.minimum(lam * rate, room)


def fab(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
        key: jax.Array, norm: str = "linf", eps: core.Eps | None = None, steps: int = 100,
        n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
        targeted: bool = False, num_targets: int = 9,
        first_target: int | jax.Array = 0, compact: bool = True) -> jax.Array:
  """FAB in linf or l2; returns adversarial images [B, H, W, C] in [0, 1].

  Args:
    logits_fn: images in [0, 1] -> logits [B, K].
    x: clean images [B, H, W, C] in [0, 1].
    y: int labels [B].
    key: PRNG key for the random restarts (restart 0 starts at x, the others at a random point
      at distance min(best norm so far, eps or 0.3 linf / 1.0 l2) / 2 from x, as in the
      reference).
    norm: 'linf' or 'l2'.
    eps: None for the minimum-norm attack. Given (scalar or per-example [B]; AutoAttack runs
      FAB-T at a fixed eps), only perturbations with norm <= eps are returned, the random
      restarts use radius min(best, eps) / 2, and runs are skipped once every example is fooled
      within eps.
    steps: iterations per run (reference: 100).
    n_restarts: runs per target class (untargeted: runs in total).
    alpha_max, eta, beta: the maximal weight of the clean-image projection, the overshoot, and
      the backward step towards x after a success (reference: 0.1, 1.05, 0.9).
    targeted: False runs FAB against the nearest class among all (K backward passes a step);
      True runs FAB-T, one run per target class, the 2nd..(num_targets+1)-th largest clean logits
      (one backward pass a step). Success is misclassification in both, as in the reference.
    num_targets: target classes for FAB-T (reference: 9); all other classes if the model has
      fewer than num_targets + 1.
    first_target: FAB-T starts at the (2 + first_target)-th largest clean logit (may be traced).
    compact: with eps, stop stepping a point once it is fooled within eps, and pass only the
      points still in play to the model (`core.on_active_rows`); later targets then attack only
      the points no earlier one fooled, as the reference's loop over targets does. Which points
      end up fooled within eps is unchanged (a success is never undone); their returned
      example is the first one within eps, not the smallest.

  Returns, per example, the fooling iterate of smallest norm over all runs; x itself where none
  was found (or none within eps) and where x is already misclassified.
  """
  core.check_images(x)
  if norm not in core.NORMS:
    raise ValueError(f"FAB supports norm in {list(core.NORMS)}, got {norm!r}.")
  if eps is not None:
    core.check_eps(eps, norm)
  for name, value in (("steps", steps), ("n_restarts", n_restarts), ("num_targets", num_targets)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta <= 1):
    raise ValueError(f"FAB needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta <= 1; got "
                     f"alpha_max={alpha_max}, eta={eta}, beta={beta}.")
  x = jax.lax.stop_gradient(x)
  y = y.astype(jnp.int32)
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)

  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  if targeted:
    num_targets = min(num_targets, num_classes - 1)
    ranked_classes = jnp.argsort(-clean_logits, axis=1)  # rank 0 is the predicted class
    num_runs = num_targets * n_restarts
  else:
    all_classes = jnp.broadcast_to(jnp.arange(num_classes), (batch, num_classes))
    num_runs = n_restarts
  restart_eps = DEFAULT_RESTART_EPS[norm] if eps is None else eps
  # The minimum-norm attack (no eps) never stops a row: each keeps shrinking its perturbation.
  eps_rows = jnp.broadcast_to(jnp.asarray(-1.0 if eps is None else eps, x.dtype), (batch,))
  compact = compact and eps is not None

  def random_start(run_key, best_norm):
    radius = 0.5 * jnp.minimum(best_norm, restart_eps)[:, None]
    if norm == "linf":
      u = jax.random.uniform(run_key, x0.shape, x0.dtype, -1.0, 1.0)
    else:
      u = jax.random.normal(run_key, x0.shape, x0.dtype)
    return jnp.clip(x0 + radius * u / jnp.maximum(core.lp_norm(u, norm), 1e-12)[:, None], 0., 1.)

  def fab_step(rows, consts):
    """One FAB step of the rows given (all of them, or a compacted slice)."""
    x1, best_norm, best_adv = rows
    x0, y, classes, eps_rows = consts
    n = x1.shape[0]
    shape = (n,) + x.shape[1:]
    _, diffs, grads = class_difference_grads(logits_fn, x1.reshape(shape), y, classes)
    # Linearised distance to each class's boundary; the true class is not a boundary.
    distances = jnp.abs(diffs) / (per_class_norm(grads, DUAL_NORM[norm]) + 1e-12)
    distances = jnp.where(classes == y[:, None], jnp.inf, distances)
    nearest = jnp.argmin(distances, axis=1)
    w = jnp.take_along_axis(grads.reshape(n, classes.shape[1], -1), nearest[:, None, None],
                            axis=1)[:, 0]
    diff = jnp.take_along_axis(diffs, nearest[:, None], axis=1)[:, 0]
    # The hyperplane <w, z> = b is where the linearisation at x1 of z_c - z_y vanishes.
    b = jnp.sum(w * x1, axis=1) - diff
    steps_both = project_onto_hyperplane_in_box(
        jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm)
    d1, d2 = steps_both[:n], steps_both[n:]
    lengths = jnp.maximum(core.lp_norm(steps_both, norm), 1e-8)
    a1, a2 = lengths[:n], lengths[n:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1_new = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)

    fooled = core.misclassified(logits_fn(x1_new.reshape(shape)), y)
    x1_norm = core.lp_norm(x1_new - x0, norm)
    improved = fooled & (x1_norm < best_norm)
    new_adv = jnp.where(improved[:, None], x1_new, best_adv)
    new_norm = jnp.where(improved, x1_norm, best_norm)
    # After a success, step back towards x to look for a closer boundary point.
    x1_new = jnp.where(fooled[:, None], x0 + beta * (x1_new - x0), x1_new)
    # With compact, a row already fooled within eps is done (it may pad a compacted slice).
    done = ((best_norm <= eps_rows) & compact)[:, None]
    return (jnp.where(done, x1, x1_new), jnp.where(done[:, 0], best_norm, new_norm),
            jnp.where(done, best_adv, new_adv))

  def run(run_index, best):
    best_norm, best_adv = best
    restart = run_index % n_restarts
    if targeted:
      target = jax.lax.dynamic_index_in_dim(
          ranked_classes, 1 + first_target + run_index // n_restarts, axis=1)
      classes = target  # [B, 1]
    else:
      classes = all_classes
    x1 = jnp.where(restart == 0, x0,
                   random_start(jax.random.fold_in(key, run_index), best_norm))
    consts = (x0, y, classes, eps_rows)

    def step(_, carry):
      if not compact:
        return fab_step(carry, consts)
      return core.on_active_rows(fab_step, carry[1] > eps_rows, carry, consts,
                                 chunk=core.compact_chunk(batch))

    _, best_norm, best_adv = jax.lax.fori_loop(0, steps, step, (x1, best_norm, best_adv))
    return best_norm, best_adv

  def maybe_run(run_index, best):
    if eps is None:
      return run(run_index, best)
    # AutoAttack only attacks points still robust; with fixed shapes, skip whole runs instead.
    all_done = jnp.all(best[0] <= eps)
    return jax.lax.cond(all_done, lambda b: b, lambda b: run(run_index, b), best)

  # Already misclassified examples need no perturbation.
  best_norm = jnp.where(core.misclassified(clean_logits, y), 0.0, jnp.inf)
  best_norm, best_adv = jax.lax.fori_loop(0, num_runs, maybe_run, (best_norm, x0))
  if eps is not None:
    best_adv = jnp.where((best_norm <= eps)[:, None], best_adv, x0)
  return jax.lax.stop_gradient(best_adv.reshape(x.shape))

"""Plumbing shared by every attack: norms, projections, starts, eps checks, batched runners.

Conventions (docs/design.md, "Attacks"): images are float32 NHWC in [0, 1], labels int32 [B], a
model is a pure `logits_fn(x) -> logits [B, K]`. Every loss (gfa_jax.numerics, re-exported here
for the attacks) returns one value per example [B] that an attack MAXIMISES, so attacks can
pick the best iterate per example by comparing losses.
"""

from __future__ import annotations

import fractions
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gfa_jax import batching, eval_units, numerics
# The shared numerics (losses, input checks), re-exported under the names the attacks use.
from gfa_jax.numerics import (LOSSES, LogitsFn, LossFn, check_images, dlr_loss,  # noqa: F401
                              is_better, loss_and_grad, margin_loss, misclassified, resolve_loss,
                              safe_norm, targeted_dlr_loss)
from gfa_jax.numerics import cross_entropy as ce_loss  # noqa: F401

NORMS = ("linf", "l2")
# l1 is supported by the geometry helpers (projection, norms) for the L1 attacks (EAD), but no
# gradient attack here steps in l1, so it is not in NORMS.
_GEOMETRY_NORMS = ("linf", "l2", "l1")

Eps = float | jax.Array


# ----------------------------------------------------------------------------------------------
# Geometry: norms, projections, steepest-ascent directions, random starts.
# ----------------------------------------------------------------------------------------------


def batch_broadcast(value: Eps, x: jax.Array) -> jax.Array:
  """Reshapes a scalar or per-example [B] value (eps, mask, norm) to broadcast against x [B, ...]."""
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(x.dtype)
  return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def _check_norm(norm: str, allowed: Sequence[str] = _GEOMETRY_NORMS) -> None:
  if norm not in allowed:
    raise ValueError(f"Unknown or unsupported norm {norm!r}: use one of {list(allowed)}.")


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example norm over all non-batch axes, [B]. The l2 norm has gradient 0 (not NaN) at 0."""
  _check_norm(norm)
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  if norm == "l1":
    return jnp.sum(jnp.abs(flat), axis=1)
  return safe_norm(flat, axis=1)


def _project_l1_ball(delta: jax.Array, eps: jax.Array) -> jax.Array:
  """Euclidean projection of each row of delta [B, D] onto the l1 ball of radius eps [B, 1].

  Sort-based algorithm of Duchi et al. (2008), O(D log D).
  """
  abs_delta = jnp.abs(delta)
  mu = -jnp.sort(-abs_delta, axis=1)  # descending
  cumsum = jnp.cumsum(mu, axis=1)
  ranks = jnp.arange(1, delta.shape[1] + 1, dtype=delta.dtype)
  feasible = mu - (cumsum - eps) / ranks > 0
  rho = jnp.maximum(jnp.sum(feasible, axis=1, keepdims=True), 1)
  theta = (jnp.take_along_axis(cumsum, rho - 1, axis=1) - eps) / rho.astype(delta.dtype)
  projected = jnp.sign(delta) * jnp.maximum(abs_delta - theta, 0.0)
  inside = jnp.sum(abs_delta, axis=1, keepdims=True) <= eps
  return jnp.where(inside, delta, projected)


def project(x_adv: jax.Array, x: jax.Array, eps: Eps, norm: str) -> jax.Array:
  """Projects x_adv onto the eps-ball around x in `norm`, then clips into [0, 1].

  Clipping after the projection keeps the result inside the ball: x is in [0, 1], so clipping
  only shrinks each coordinate of the perturbation. Hence the map is idempotent.
  eps is a scalar or per-example [B].
  """
  _check_norm(norm)
  delta = x_adv - x
  eps_b = batch_broadcast(eps, x)
  if norm == "linf":
    delta = jnp.clip(delta, -eps_b, eps_b)
  elif norm == "l2":
    length = batch_broadcast(lp_norm(delta, "l2"), x)
    delta = delta * jnp.minimum(1.0, eps_b / jnp.maximum(length, 1e-12))
  else:
    flat_eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype).reshape(-1, 1), (x.shape[0], 1))
    delta = _project_l1_ball(delta.reshape(x.shape[0], -1), flat_eps).reshape(x.shape)
  return jnp.clip(x + delta, 0.0, 1.0)


def steepest_ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Unit-norm direction maximising <grad, d>: sign(grad) for linf, grad/||grad||_2 for l2.

  A zero gradient gives a zero direction (the attack then does not move).
  """
  _check_norm(norm, NORMS)
  if norm == "linf":
    return jnp.sign(grad)
  length = batch_broadcast(lp_norm(grad, "l2"), grad)
  return grad / (length + 1e-12)  # AutoAttack's normalisation, also for vanishing gradients


def random_init(key: jax.Array, x: jax.Array, eps: Eps, norm: str, *,
                on_sphere: bool = False) -> jax.Array:
  """Random start in the eps-ball around x, clipped to [0, 1].

  linf: uniform in the cube (Madry et al.); l2: uniform direction, radius eps * U(0, 1).
  on_sphere=True starts on the ball's surface instead, as AutoAttack's APGD does
  (linf: u / max|u| * eps with u ~ U(-1, 1); l2: gaussian direction with radius eps).
  """
  _check_norm(norm, NORMS)
  eps_b = batch_broadcast(eps, x)
  key_dir, key_radius = jax.random.split(key)
  if norm == "linf":
    u = jax.random.uniform(key_dir, x.shape, x.dtype, -1.0, 1.0)
    if on_sphere:
      u = u / batch_broadcast(jnp.maximum(lp_norm(u, "linf"), 1e-12), x)
  else:
    u = steepest_ascent_direction(jax.random.normal(key_dir, x.shape, x.dtype), "l2")
    if not on_sphere:
      u = u * batch_broadcast(jax.random.uniform(key_radius, x.shape[:1], x.dtype), x)
  return jnp.clip(x + eps_b * u, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Compaction: stepping only the rows still in play.
# ----------------------------------------------------------------------------------------------


def compact_chunk(batch: int) -> int:
  """Rows per model call of a compacted gradient attack (`on_active_rows` with `chunk`): half
  the batch, at least 64. Half, because on this CPU four calls of 64 rows cost 10-15 % more
  than one of 250 for FAB-T, whose points rarely fool, while two of 125 cost the same; at
  least 64, where the time per image has levelled off (benchmarks/README.md)."""
  return min(batch, max(64, -(-batch // 2)))


def on_active_rows(update: Callable, active: jax.Array, state, consts=(),
                   chunk: int | None = None):
  """``update(state_rows, const_rows) -> state_rows`` on the rows where `active` is True only.

  Returns `state` (a pytree of [B, ...] arrays) with the updated rows written back. Why: an
  attack that keeps searching only for the points not yet fooled (Square, APGD, FAB-T, as the
  reference attacks only the points still robust) would otherwise pay a whole-batch model call
  per step for the few points left. The active rows go first (stable order); shapes stay
  static and everything stays in one compiled loop, in one of two ways:

  - `chunk=None`: `update` runs once, on the smallest slice, of size B or a power of two below
    it, that holds the active rows (one `lax.switch` branch per size: the model compiles once
    per size). For Square's forward passes, cheap to compile and inefficient in small calls.
  - `chunk=n`: `update` runs on ceil(active / n) slices of n rows in a loop: the model
    compiles once, and at most n - 1 rows a step are wasted. For the gradient attacks, whose
    forward and backward pass compiled for five to seven slice sizes cost more than a
    200-image run saved.

  The inactive rows that fill a slice are updated too and written back, so `update` must leave
  an inactive row unchanged (as an accept-if-still-robust step does); rows past the batch end
  (chunks) are computed on a copy and dropped.
  """
  b = active.shape[0]
  order = jnp.argsort(~active, stable=True)  # active rows first, in their batch order

  def apply(rows, state):
    take = functools.partial(jax.tree.map, lambda a: jnp.take(a, rows, axis=0, mode="clip"))
    new = update(take(state), take(consts))
    return jax.tree.map(lambda full, part: full.at[rows].set(part, mode="drop"), state, new)

  if chunk is not None:
    chunk = min(chunk, b)
    padded = -(-b // chunk) * chunk
    order = jnp.concatenate([order, jnp.full((padded - b,), b, order.dtype)])  # dropped rows
    one_chunk = lambda i, s: apply(jax.lax.dynamic_slice_in_dim(order, i * chunk, chunk), s)
    return jax.lax.fori_loop(0, -(-jnp.sum(active) // chunk), one_chunk, state)
  sizes = sorted({b} | {2 ** k for k in range(b.bit_length()) if 2 ** k < b})
  if len(sizes) == 1:
    return apply(order, state)
  index = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(active))  # the first size >= count
  return jax.lax.switch(index, [functools.partial(apply, order[:size]) for size in sizes], state)


# ----------------------------------------------------------------------------------------------
# Input checks (Python level, before tracing work) and the output check evaluation relies on.
# ----------------------------------------------------------------------------------------------


def _is_traced(a) -> bool:
  return isinstance(a, jax.core.Tracer)


def check_eps(eps: Eps, norm: str, allowed_norms: Sequence[str] = NORMS, x=None) -> None:
  """Raises ValueError if norm is not in allowed_norms, eps is not a number (or, with the
  images ``x``, one number per image), eps < 0, or (linf) eps > 1."""
  _check_norm(norm, allowed_norms)
  if _is_traced(eps):
    return
  try:
    values = np.asarray(eps, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"eps must be a number (or one per image), got {eps!r:.80}; pass e.g. "
                     "eps=8/255") from e
  batch = None if x is None else np.shape(x)[0]
  if values.ndim > 1 or (batch is not None and values.ndim == 1 and values.shape[0] != batch):
    raise ValueError(f"eps must be a number{'' if batch is None else f' or one per image [{batch}]'}"
                     f", got shape {values.shape}; attack one eps per call (evaluate takes a "
                     "list)")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"eps must be finite, got {eps!r}.")
  if np.any(values < 0):
    raise ValueError(f"eps must be >= 0, got {eps!r}.")
  if norm == "linf" and np.any(values > 1):
    raise ValueError(f"Linf eps must be <= 1 for images in [0, 1], got {eps!r}. "
                     "Did you mean a fraction such as 8/255?")


def check_labels(logits_fn: Callable, x, y, loss: str | LossFn = "ce", *args) -> None:
  """Raises ValueError unless concrete ``y`` are integer class indices below the number of
  logits ``logits_fn(x, *args)`` returns (found by ``jax.eval_shape``: no FLOPs), one per
  image; returns None. Skipped inside jit (values unknown) and for a callable loss, whose
  ``y`` may be anything (e.g. TRADES' clean probabilities)."""
  if callable(loss) or _is_traced(x) or _is_traced(y):
    return
  logits = jax.eval_shape(logits_fn, x, *args)
  numerics.check_logits(logits, np.shape(x)[0])
  numerics.check_labels(y, logits.shape[-1], np.shape(x)[0])


def check_adversarial(x_adv, x, eps: Eps, norm: str, atol: float = 1e-5) -> np.ndarray:
  """Host-side check that every x_adv[i] lies within eps of x[i] in `norm` and inside [0, 1].

  Evaluation runs this on every attack's output, so a buggy attack cannot report robustness
  numbers for points outside the threat model. Returns the per-example perturbation norms [B];
  raises ValueError naming how many examples violate and by how much.
  """
  _check_norm(norm)
  x_adv = np.asarray(x_adv, dtype=np.float64)
  x = np.asarray(x, dtype=np.float64)
  if x_adv.shape != x.shape:
    raise ValueError(f"x_adv has shape {x_adv.shape} but x has shape {x.shape}.")
  flat_adv = x_adv.reshape(x.shape[0], -1)
  out_of_box = np.maximum(-flat_adv.min(axis=1), flat_adv.max(axis=1) - 1.0)
  bad_box = out_of_box > atol
  if np.any(bad_box):
    raise ValueError(f"{int(bad_box.sum())} of {len(bad_box)} adversarial examples leave [0, 1] "
                     f"(by up to {out_of_box.max():.3g}).")
  delta = (flat_adv - x.reshape(x.shape[0], -1))
  order = {"linf": np.inf, "l2": 2, "l1": 1}[norm]
  norms = np.linalg.norm(delta, ord=order, axis=1)
  excess = norms - np.broadcast_to(np.asarray(eps, dtype=np.float64), norms.shape)
  bad_eps = excess > atol
  if np.any(bad_eps):
    raise ValueError(f"{int(bad_eps.sum())} of {len(bad_eps)} adversarial examples exceed "
                     f"{norm} eps={eps!r} (by up to {excess.max():.3g}).")
  return norms


# ----------------------------------------------------------------------------------------------
# Parsing eps from the command line.
# ----------------------------------------------------------------------------------------------


def parse_eps(text: str | float) -> float:
  """Parses '8/255', '0.03' or '0' (or a number) into a finite float >= 0."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    try:
      value = float(fractions.Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError, OverflowError) as e:  # OverflowError: 1e400
      raise ValueError(f"Cannot parse eps {text!r}: write a number or a fraction such as "
                       "8/255.") from e
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"eps must be a finite number >= 0, got {text!r}.")
  return value


def parse_eps_list(text: str) -> list[float]:
  """Parses a comma-separated list such as '0,1/255,8/255' into floats."""
  items = [item.strip() for item in str(text).split(",")]
  if not items or any(not item for item in items):
    raise ValueError(f"Cannot parse eps list {text!r}: write comma-separated values such as "
                     "0,1/255,8/255 (no empty entries).")
  return [parse_eps(item) for item in items]


# ----------------------------------------------------------------------------------------------
# Attacks over arrays of any length (batching and padding: gfa_jax.batching).
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("attack", "hparams"))
def _attack_batch(x, y, key, eps, logits_fn, *, attack, hparams):
  kwargs = dict(hparams)
  if eps is not None:
    kwargs["eps"] = eps
  return attack(logits_fn, x, y, key=key, **kwargs)


def run_in_batches(attack: Callable, logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                   key: jax.Array, batch_size: int, eps: float | None = None,
                   hparams: Sequence[tuple] = (), progress: tqdm.tqdm | None = None,
                   bucket: bool = False) -> np.ndarray:
  """Runs `attack(logits_fn, x, y, key=..., [eps=...], **hparams)` over batches; numpy [N, ...].

  Batch i gets the key fold_in(key, i). `hparams` is a tuple of (name, value) pairs (hashable:
  it keys the compilation cache together with the attack and logits_fn). `progress`, a tqdm
  bar, advances by one per batch; `bucket` pads fewer than batch_size rows to the next
  `batching.bucket_size`. Within `eval_units.recording` each batch is a unit: loaded if stored, else computed (by
  this process, or read from the one that owns it) and stored.
  """
  eps = None if eps is None else jnp.asarray(eps, jnp.float32)
  model, hparams = batching.as_pytree(logits_fn), tuple(hparams)

  def run(xb, yb, key_b):
    return _attack_batch(xb, yb, key_b, eps, model, attack=attack, hparams=hparams)

  units = eval_units.batch_units(len(x), batch_size, bucket)
  out = batching.map_batches(run if units is None else units.wrap(run),
                             [np.asarray(x, np.float32), np.asarray(y, np.int32)],
                             batch_size, key=key, bucket=bucket, progress=progress)
  if out is None:
    return np.zeros_like(np.asarray(x, np.float32))
  return out if units is None else units.complete(out)

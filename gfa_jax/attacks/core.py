"""Plumbing shared by every attack: losses, norms, projections, starts and input checks.

Conventions (see ATTACKS_API.md): images are float32 NHWC in [0, 1], labels int32 [B], a model is
a pure `logits_fn(x) -> logits [B, K]`. Every loss here returns one value per example [B] that an
attack MAXIMISES, so attacks can pick the best iterate per example by comparing losses.
"""

from __future__ import annotations

import fractions
import functools
import inspect
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

LogitsFn = Callable[[jax.Array], jax.Array]

NORMS = ('linf', 'l2')
# l1 is supported by the geometry helpers (projection, norms) for the L1 attacks (EAD), but no
# gradient attack here steps in l1, so it is not in NORMS.
_GEOMETRY_NORMS = ('linf', 'l2', 'l1')

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Eps = Union[float, jax.Array]


# ----------------------------------------------------------------------------------------------
# Losses (per example, to be maximised).
# ----------------------------------------------------------------------------------------------


def _true_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i, per example."""
  is_true = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
  return jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)


def _require_classes(logits: jax.Array, minimum: int, name: str) -> None:
  if logits.shape[-1] < minimum:
    raise ValueError(
        f'{name} needs at least {minimum} classes (it divides by a gap between sorted logits), '
        f'got logits of shape {logits.shape}. Use loss="ce" or "margin" for fewer classes.')


def ce_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy of integer labels, [B] float32."""
  logits = logits.astype(jnp.float32)
  return -_true_logit(jax.nn.log_softmax(logits, axis=-1), y)


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """AutoAttack's Difference of Logits Ratio, [B]: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).

  Invariant to shifting and scaling the logits, so it is not fooled by a model that merely
  saturates its softmax (Croce & Hein 2020, eq. 5). Needs at least 3 classes.
  """
  _require_classes(logits, 3, 'dlr_loss')
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)  # ascending: [..., pi3, pi2, pi1]
  scale = z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
  return -(_true_logit(logits, y) - _max_other_logit(logits, y)) / scale


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
  """AutoAttack's targeted DLR, [B]: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).

  Needs at least 4 classes.
  """
  _require_classes(logits, 4, 'targeted_dlr_loss')
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  scale = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
  return -(_true_logit(logits, y) - _true_logit(logits, y_target)) / scale


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i - z_y, [B]: positive exactly when the example is misclassified."""
  logits = logits.astype(jnp.float32)
  return _max_other_logit(logits, y) - _true_logit(logits, y)


LOSSES: dict[str, LossFn] = {'ce': ce_loss, 'dlr': dlr_loss, 'margin': margin_loss}


def resolve_loss(loss: Union[str, LossFn]) -> LossFn:
  """Returns the loss function for a name in LOSSES, or `loss` itself if it is callable."""
  if callable(loss):
    return loss
  if loss not in LOSSES:
    raise ValueError(f'Unknown loss {loss!r}: use one of {sorted(LOSSES)} or a callable '
                     '(logits, y) -> per-example loss [B].')
  return LOSSES[loss]


def loss_and_grad(logits_fn: Callable[[jax.Array], jax.Array], loss_fn: LossFn,
                  ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """Returns `f(x, y) -> (loss [B], logits [B, K], grad of loss wrt x [B, H, W, C])`.

  One backward pass gives every example's own gradient because examples do not interact (models
  are in inference mode), so the gradient of the batch sum is the stack of per-example ones.
  """
  def total_loss(x, y):
    logits = logits_fn(x)
    loss = loss_fn(logits, y)
    return jnp.sum(loss), (loss, logits)

  def f(x, y):
    (_, (loss, logits)), grad = jax.value_and_grad(total_loss, has_aux=True)(x, y)
    return loss, logits, grad

  return f


# ----------------------------------------------------------------------------------------------
# Keeping the best point per example.
# ----------------------------------------------------------------------------------------------


def is_better(loss: jax.Array, fooled: jax.Array, best_loss: jax.Array,
              best_fooled: jax.Array) -> jax.Array:
  """Per-example: is (fooled, loss) better than (best_fooled, best_loss)?

  A point that fools the model beats one that does not, whatever their losses; among points with
  the same outcome the higher loss wins. Ranking by loss alone could trade a misclassified point
  for a correctly classified one: with more than two classes, CE can be higher at the latter.
  """
  return (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))


def misclassified(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example bool [B]: argmax(logits) != y, or all False when y is not integer labels.

  With a callable loss y may be something else (e.g. TRADES' clean probabilities); then the best
  iterate is ranked by loss only.
  """
  if jnp.issubdtype(y.dtype, jnp.integer) and y.shape == logits.shape[:1]:
    return jnp.argmax(logits, axis=-1) != y
  return jnp.zeros(logits.shape[:1], jnp.bool_)


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
    raise ValueError(f'Unknown or unsupported norm {norm!r}: use one of {list(allowed)}.')


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example norm over all non-batch axes, [B]. The l2 norm has gradient 0 (not NaN) at 0."""
  _check_norm(norm)
  flat = v.reshape(v.shape[0], -1)
  if norm == 'linf':
    return jnp.max(jnp.abs(flat), axis=1)
  if norm == 'l1':
    return jnp.sum(jnp.abs(flat), axis=1)
  sq = jnp.sum(flat * flat, axis=1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


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
  if norm == 'linf':
    delta = jnp.clip(delta, -eps_b, eps_b)
  elif norm == 'l2':
    length = batch_broadcast(lp_norm(delta, 'l2'), x)
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
  if norm == 'linf':
    return jnp.sign(grad)
  length = batch_broadcast(lp_norm(grad, 'l2'), grad)
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
  if norm == 'linf':
    u = jax.random.uniform(key_dir, x.shape, x.dtype, -1.0, 1.0)
    if on_sphere:
      u = u / batch_broadcast(jnp.maximum(lp_norm(u, 'linf'), 1e-12), x)
  else:
    u = steepest_ascent_direction(jax.random.normal(key_dir, x.shape, x.dtype), 'l2')
    if not on_sphere:
      u = u * batch_broadcast(jax.random.uniform(key_radius, x.shape[:1], x.dtype), x)
  return jnp.clip(x + eps_b * u, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Input checks (Python level, before tracing work) and the output check evaluation relies on.
# ----------------------------------------------------------------------------------------------


def _is_traced(a) -> bool:
  return isinstance(a, jax.core.Tracer)


def check_images(x: jax.Array) -> None:
  """Raises ValueError unless x is a float 4-D NHWC batch with values in [0, 1].

  The range is only checked for concrete arrays (inside jit values are unknown); shapes and
  dtypes are always checked.
  """
  if not hasattr(x, 'ndim') or x.ndim != 4:
    raise ValueError(f'Images must be a 4-D NHWC array [B, H, W, C], got shape '
                     f'{getattr(x, "shape", type(x))}. Add a batch axis with x[None] if needed.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'Images must be floating point in [0, 1], got dtype {x.dtype}. '
                     'Convert uint8 images with x.astype(np.float32) / 255.')
  if _is_traced(x):
    return
  values = np.asarray(x)  # on the host: jnp ops would be staged if a caller is tracing
  lo, hi = float(values.min()), float(values.max())
  if not (0.0 <= lo and hi <= 1.0):
    raise ValueError(f'Images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. Attacks '
                     'take unnormalised images; put any normalisation inside the model.')


def check_eps(eps: Eps, norm: str, allowed_norms: Sequence[str] = NORMS) -> None:
  """Raises ValueError if norm is not in allowed_norms, eps < 0, or (linf) eps > 1."""
  _check_norm(norm, allowed_norms)
  if _is_traced(eps):
    return
  values = np.asarray(eps, dtype=np.float64)
  if not np.all(np.isfinite(values)):
    raise ValueError(f'eps must be finite, got {eps!r}.')
  if np.any(values < 0):
    raise ValueError(f'eps must be >= 0, got {eps!r}.')
  if norm == 'linf' and np.any(values > 1):
    raise ValueError(f'Linf eps must be <= 1 for images in [0, 1], got {eps!r}. '
                     'Did you mean a fraction such as 8/255?')


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
    raise ValueError(f'x_adv has shape {x_adv.shape} but x has shape {x.shape}.')
  flat_adv = x_adv.reshape(x.shape[0], -1)
  out_of_box = np.maximum(-flat_adv.min(axis=1), flat_adv.max(axis=1) - 1.0)
  bad_box = out_of_box > atol
  if np.any(bad_box):
    raise ValueError(f'{int(bad_box.sum())} of {len(bad_box)} adversarial examples leave [0, 1] '
                     f'(by up to {out_of_box.max():.3g}).')
  delta = (flat_adv - x.reshape(x.shape[0], -1))
  order = {'linf': np.inf, 'l2': 2, 'l1': 1}[norm]
  norms = np.linalg.norm(delta, ord=order, axis=1)
  excess = norms - np.broadcast_to(np.asarray(eps, dtype=np.float64), norms.shape)
  bad_eps = excess > atol
  if np.any(bad_eps):
    raise ValueError(f'{int(bad_eps.sum())} of {len(bad_eps)} adversarial examples exceed '
                     f'{norm} eps={eps!r} (by up to {excess.max():.3g}).')
  return norms


# ----------------------------------------------------------------------------------------------
# Parsing eps from the command line.
# ----------------------------------------------------------------------------------------------


def parse_eps(text: Union[str, float]) -> float:
  """Parses '8/255', '0.03' or '0' (or a number) into a finite float >= 0."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    try:
      value = float(fractions.Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError) as e:
      raise ValueError(f'Cannot parse eps {text!r}: write a number or a fraction such as '
                       '8/255.') from e
  if not math.isfinite(value) or value < 0:
    raise ValueError(f'eps must be a finite number >= 0, got {text!r}.')
  return value


def parse_eps_list(text: str) -> list[float]:
  """Parses a comma-separated list such as '0,1/255,8/255' into floats."""
  items = [item.strip() for item in str(text).split(',')]
  if not items or any(not item for item in items):
    raise ValueError(f'Cannot parse eps list {text!r}: write comma-separated values such as '
                     '0,1/255,8/255 (no empty entries).')
  return [parse_eps(item) for item in items]


# ----------------------------------------------------------------------------------------------
# Batched host-side execution (attacks over arrays of any length).
# ----------------------------------------------------------------------------------------------


def bind(apply_fn: Callable, variables) -> jax.tree_util.Partial:
  """``logits_fn(x) = apply_fn(variables, x)`` with the variables as a traced argument.

  Attacks and predictions are compiled per function *and* per value of whatever a static
  function closes over: a ``functools.partial(apply_fn, variables)`` compiles again for every
  model and keeps each model's weights alive in the jit cache. A ``jax.tree_util.Partial`` is
  a pytree whose leaves (the weights) are traced, so a second model of the same architecture
  (the same ``apply_fn``, e.g. ``models.from_config`` of an equal config) reuses
  every compiled attack.
  """
  return jax.tree_util.Partial(apply_fn, variables)


def _as_pytree(logits_fn: Callable) -> jax.tree_util.Partial:
  """Any callable as a pytree argument of a jitted function: a ``bind``-made Partial as it is
  (its weights traced), any other function as a leafless Partial (static, as before)."""
  return logits_fn if isinstance(logits_fn, jax.tree_util.Partial) else jax.tree_util.Partial(logits_fn)


@jax.jit
def _predict_batch(x, logits_fn):
  return jnp.argmax(logits_fn(x), axis=-1)


@functools.partial(jax.jit, static_argnames=('attack', 'hparams'))
def _attack_batch(x, y, key, eps, traced, logits_fn, *, attack, hparams):
  kwargs = {**dict(hparams), **traced}
  if eps is not None:
    kwargs['eps'] = eps
  return attack(logits_fn, x, y, key=key, **kwargs)


def splits_per_target(attack: Callable, hparams: Sequence[tuple]) -> bool:
  """Whether `run_per_target` should run this attack: a targeted attack over several targets
  (APGD-T, FAB-T: a `first_target` argument and num_targets > 1 in `hparams`)."""
  hp = dict(hparams)
  return ('first_target' in inspect.signature(attack).parameters and hp.get('num_targets', 1) > 1
          and hp.get('targeted', True))


def run_per_target(attack: Callable, logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                   key: jax.Array, batch_size: int, eps: Optional[float] = None,
                   hparams: Sequence[tuple] = (), progress: Optional[tqdm.tqdm] = None,
                   bucket: bool = True) -> np.ndarray:
  """A multi-target attack one target at a time, each on the points no earlier target fooled.

  The reference's APGD-T and FAB-T loop over targets on the host and attack only the points
  still robust (`perturb`, `ind_to_fool = acc.nonzero()`); batching all targets under jit
  instead attacks every point with every target, 3x the work on a model that most targets
  break. Target t runs with key fold_in(key, t) and `first_target=t` as a traced scalar (one
  compile for all targets; `bucket` pads shrinking sets to powers of two). Returns numpy x_adv
  [N, ...]: the fooling example of the first target that fooled a point, else the last
  target's example. `x` must hold only points to attack (correct clean).
  """
  hp = dict(hparams)
  num_targets = hp.pop('num_targets')
  hp['num_targets'] = 1
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  x_adv = x.copy()
  todo = np.arange(len(x))
  for target in range(num_targets):
    if not len(todo):
      break
    candidates = run_in_batches(attack, logits_fn, x[todo], y[todo],
                                key=jax.random.fold_in(key, target), batch_size=batch_size,
                                eps=eps, hparams=tuple(hp.items()), bucket=bucket,
                                traced={'first_target': target})
    x_adv[todo] = candidates
    fooled = predict(logits_fn, candidates, batch_size) != y[todo]
    todo = todo[~fooled]
  if progress is not None:  # The bars count batches of the whole set.
    progress.update(len(_batches(len(x), batch_size)))
  return x_adv


def _batches(n: int, batch_size: int, bucket: bool = False):
  """(start, stop, padded size) of each batch.

  Without `bucket` every batch is padded to the same size (one compile). With `bucket`, full
  batches of batch_size, then the remainder padded up to a power of two, so that calls on
  varying numbers of rows (AutoAttack's and APGD-T's shrinking robust sets) reuse at most
  log2(batch_size) + 1 compiled shapes while padding less than half of the last batch (280
  points at batch 250 are 250 + 32 rows, not 2 x 250).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  size = min(batch_size, n)
  if not bucket:
    return [(start, min(start + size, n), size) for start in range(0, n, size)]
  batches = [(start, start + batch_size, batch_size) for start in range(0, n - batch_size + 1, batch_size)]
  rest = n - len(batches) * batch_size
  if rest:
    padded = min(batch_size, 1 << max(rest - 1, 0).bit_length())
    batches.append((n - rest, n, padded))
  return batches


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  """Pads the first axis to `size` by repeating the last row (padded rows are discarded)."""
  missing = size - a.shape[0]
  return a if missing == 0 else np.concatenate([a, np.repeat(a[-1:], missing, axis=0)])


def predict(logits_fn: LogitsFn, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes [N] (numpy) of images x [N, H, W, C], in jit-compiled batches."""
  x = np.asarray(x, np.float32)
  out = [np.asarray(_predict_batch(_pad(x[a:b], size), _as_pytree(logits_fn)))[:b - a]
         for a, b, size in _batches(len(x), batch_size, bucket=True)]
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def run_in_batches(attack: Callable, logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                   key: jax.Array, batch_size: int, eps: Optional[float] = None,
                   hparams: Sequence[tuple] = (), progress: Optional[tqdm.tqdm] = None,
                   bucket: bool = False, traced: Optional[dict] = None) -> np.ndarray:
  """Runs `attack(logits_fn, x, y, key=..., [eps=...], **hparams)` over batches; numpy [N, ...].

  Batch i gets the key fold_in(key, i). `hparams` is a tuple of (name, value) pairs (hashable:
  it keys the compilation cache together with the attack and logits_fn); `traced` holds int
  keyword arguments passed as traced scalars, so changing them compiles nothing new. `progress`,
  a tqdm bar, advances by one per batch; `bucket` pads fewer than batch_size rows to a power of
  two.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  eps = None if eps is None else jnp.asarray(eps, jnp.float32)
  traced = {k: jnp.asarray(v, jnp.int32) for k, v in (traced or {}).items()}
  out = []
  for i, (a, b, size) in enumerate(_batches(len(x), batch_size, bucket)):
    x_adv = _attack_batch(_pad(x[a:b], size), _pad(y[a:b], size), jax.random.fold_in(key, i),
                          eps, traced, _as_pytree(logits_fn), attack=attack, hparams=tuple(hparams))
    out.append(np.asarray(x_adv)[:b - a])
    if progress is not None:
      progress.update(1)
  return np.concatenate(out) if out else np.zeros_like(x)

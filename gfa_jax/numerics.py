"""The numerics every part of gfa-jax shares: zero-safe norms, per-example losses, input checks.

One definition each, used by the penalty, the objectives, the attacks and the analyses, so a
fix (a NaN gradient at zero, a label check) lands everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]  # images in [0, 1] [B, H, W, C] -> logits [B, K]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits, y) -> per-example loss [B]


def safe_norm(v: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm along ``axis`` whose gradient is 0 (not NaN) at v = 0.

  ``jnp.linalg.norm`` differentiates to ``v / ||v||`` = 0/0 at zero; adding eps after the sqrt
  does not help because d sqrt(s)/ds is infinite at s = 0 and 0 * inf = NaN. GFA training
  drives whole feature maps and gradients to zero (dead ReLUs, black images), and attacks
  start at zero perturbations, so the square root is taken of a value that is never 0 on the
  differentiated branch.
  """
  squared = jnp.sum(v * v, axis=axis)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def true_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  """z_y per example, [B]."""
  return jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy of integer labels, per example [B] float32 (training takes the
  batch mean, attacks maximise it per example)."""
  logits = logits.astype(jnp.float32)
  return -true_logit(jax.nn.log_softmax(logits, axis=-1), y)


def _max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i, per example."""
  is_true = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
  return jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)


def _require_classes(logits: jax.Array, minimum: int, name: str) -> None:
  if logits.shape[-1] < minimum:
    raise ValueError(
        f'{name} needs at least {minimum} classes (it divides by a gap between sorted logits), '
        f'got logits of shape {logits.shape}. Use loss="ce" or "margin" for fewer classes.')


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """AutoAttack's Difference of Logits Ratio, [B]: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).

  Invariant to shifting and scaling the logits, so it is not fooled by a model that merely
  saturates its softmax (Croce & Hein 2020, eq. 5). Needs at least 3 classes.
  """
  _require_classes(logits, 3, "dlr_loss")
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)  # ascending: [..., pi3, pi2, pi1]
  scale = z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
  return -(true_logit(logits, y) - _max_other_logit(logits, y)) / scale


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
  """AutoAttack's targeted DLR, [B]: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).

  Needs at least 4 classes.
  """
  _require_classes(logits, 4, "targeted_dlr_loss")
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  scale = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
  return -(true_logit(logits, y) - true_logit(logits, y_target)) / scale


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i - z_y, [B]: positive exactly when the example is misclassified."""
  logits = logits.astype(jnp.float32)
  return _max_other_logit(logits, y) - true_logit(logits, y)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "dlr": dlr_loss, "margin": margin_loss}


def resolve_loss(loss: str | LossFn) -> LossFn:
  """Returns the loss function for a name in LOSSES, or `loss` itself if it is callable."""
  if callable(loss):
    return loss
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r}: use one of {sorted(LOSSES)} or a callable "
                     "(logits, y) -> per-example loss [B].")
  return LOSSES[loss]


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


def loss_and_grad(logits_fn: LogitsFn, loss_fn: LossFn,
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


def check_images(x) -> None:
  """Raises ValueError unless x is a float 4-D NHWC batch with values in [0, 1].

  The range is only checked for concrete arrays (inside jit values are unknown); shapes and
  dtypes are always checked.
  """
  if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
    raise ValueError(f"Images must be a 4-D NHWC array [B, H, W, C], got a "
                     f"{type(x).__name__}; pass np.asarray(x, np.float32).")
  if x.ndim != 4:
    raise ValueError(f'Images must be a 4-D NHWC array [B, H, W, C], got shape '
                     f'{getattr(x, "shape", type(x))}. Add a batch axis with x[None] if needed.')
  if x.shape[1] in (1, 3) and x.shape[2] == x.shape[3] > 4:  # [B, C, H, W], e.g. from torch
    raise ValueError(f"Images look channels-first [B, C, H, W] (shape {x.shape}); gfa-jax takes "
                     "NHWC: transpose them with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"Images must be floating point in [0, 1], got dtype {x.dtype}. "
                     "Convert uint8 images with x.astype(np.float32) / 255.")
  if isinstance(x, jax.core.Tracer):
    return
  values = np.asarray(x)  # on the host: jnp ops would be staged if a caller is tracing
  if not values.size:
    return
  if not np.isfinite(values).all():
    raise ValueError(f"Images must be finite, got {int((~np.isfinite(values)).sum())} NaN or "
                     "infinite values; fix the data pipeline that produced them.")
  lo, hi = float(values.min()), float(values.max())
  if not (0.0 <= lo and hi <= 1.0):
    raise ValueError(f"Images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. Attacks "
                     "take unnormalised images; put any normalisation inside the model.")


def check_labels(y, num_classes: int | None = None, num_images: int | None = None) -> None:
  """Raises ValueError unless ``y`` holds integer class indices in [0, num_classes), one per
  image; returns None. Traced labels (inside jit) are not checked: their values are unknown.

  Why: a label outside the logits is not an error to JAX (``take_along_axis`` clips or fills
  NaN), so a wrong label silently gives a NaN or wrong loss and a lower accuracy.
  """
  if isinstance(y, jax.core.Tracer):
    return
  labels = np.asarray(y)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}; cast "
                     "integer-valued labels with y.astype(np.int32) (fractional or one-hot "
                     "labels are not class indices)")
  if labels.ndim != 1 or (num_images is not None and len(labels) != num_images):
    raise ValueError(f"labels must have shape [{'B' if num_images is None else num_images}] "
                     f"(one class index per image), got shape {labels.shape}")
  if num_classes is not None and labels.size and not (
      labels.min() >= 0 and labels.max() < num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} "
                     f"logits, got values in [{labels.min()}, {labels.max()}]; fix the labels "
                     "or the model's number of classes")


def check_logits(logits, num_images: int) -> None:
  """Raises ValueError unless ``logits`` (an array or its ShapeDtypeStruct) is [num_images, K]
  with K >= 2; returns None. A model with one output has no decision to attack, and one of
  another rank is not a classifier of this batch."""
  shape = tuple(logits.shape)
  if len(shape) != 2 or shape[0] != num_images:
    raise ValueError(f"the model must return logits of shape [{num_images}, num_classes] for "
                     f"{num_images} images, got shape {shape}; return one row of class scores "
                     "per image")
  if shape[1] < 2:
    raise ValueError(f"the model returns {shape[1]} logit(s) per image; classification attacks "
                     "and accuracy need >= 2 classes (write a binary classifier as 2 logits, "
                     "[-z, z])")


def looks_like_probabilities(logits, alpha: float = 1e-5) -> bool:
  """Whether concrete outputs look like a probability distribution (in [0, 1], rows summing to
  1) rather than logits: AutoAttack's ``check_range_output`` test. Attacks on probabilities
  meet vanishing gradients and overstate robustness."""
  values = np.asarray(logits, np.float64)
  return bool(values.size and values.max() < 1 + alpha and values.min() > -alpha
              and np.all(np.abs(values.sum(-1) - 1) < alpha))


def check_batch(x, y, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images float32, labels int32) after `check_images` and `check_labels` (integer labels,
  one per image, below ``num_classes`` when given). What every host-side entry point
  (evaluate, the checklist, the analyses) accepts."""
  check_images(x)
  x = np.asarray(x, np.float32)
  check_labels(y, num_classes, len(x))
  return x, np.asarray(y).astype(np.int32)

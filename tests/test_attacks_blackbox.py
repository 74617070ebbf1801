"""Square Attack and OnePixel: black-box attacks that only query the model."""

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax.attacks import core
from gfa_jax.attacks.onepixel import onepixel
from gfa_jax.attacks.pgd import pgd
from gfa_jax.attacks.square import _eta, _window, p_schedule, square

SHAPE = (8, 8, 3)
NUM_CLASSES = 10


def linear_model(seed=0, quantise=False):
  """Random linear 10-class model on flattened images; optionally on images rounded to 1/255
  steps, a staircase whose input gradient is exactly zero everywhere."""
  w = jax.random.normal(jax.random.key(seed), (int(np.prod(SHAPE)), NUM_CLASSES))

  def logits_fn(x):
    if quantise:
      x = jnp.round(x * 255.0) / 255.0
    return (x.reshape(x.shape[0], -1) - 0.5) @ w
  return logits_fn, w


def linf_distance(logits_fn, w, x, y):
  """Exact linf distance of each x to the nearest decision boundary of the linear model (no box
  constraint binds for interior x and small distances): min_j (z_y - z_j) / ||w_y - w_j||_1."""
  z = logits_fn(x)
  diffs = jnp.take_along_axis(z, y[:, None], 1) - z  # [B, K]
  w_norms = jnp.abs(w[:, y].T[:, None, :] - w.T[None]).sum(-1)  # [B, K]
  return jnp.min(jnp.where(jax.nn.one_hot(y, NUM_CLASSES) > 0, jnp.inf, diffs / w_norms), axis=1)


def images(batch, seed=1, low=0.0, high=1.0):
  return jax.random.uniform(jax.random.key(seed), (batch, *SHAPE), minval=low, maxval=high)


@pytest.mark.slow
def test_square_breaks_a_zero_gradient_model_where_pgd_fails():
  logits_fn, w = linear_model(quantise=True)
  x = images(8, low=0.25, high=0.75)
  y = jnp.argmax(logits_fn(x), -1)
  # The premise: the model's input gradient is exactly zero, so gradient attacks cannot move.
  grad = jax.grad(lambda v: core.ce_loss(logits_fn(v), y).sum())(x)
  assert float(jnp.abs(grad).max()) == 0.0
  # eps = 2x the largest distance to the boundary (of the unquantised model, up to rounding).
  eps = float(2 * jnp.max(linf_distance(lambda v: (v.reshape(len(v), -1) - 0.5) @ w, w, x, y)))
  assert eps < 0.2  # so the [0, 1] box never binds
  x_pgd = jax.jit(lambda x: pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps,
                                steps=20))(x)
  x_sq = jax.jit(lambda x: square(logits_fn, x, y, key=jax.random.key(0), eps=eps,
                                  n_queries=1000))(x)
  core.check_adversarial(x_sq, x, eps, "linf")
  assert float(jnp.mean(jnp.argmax(logits_fn(x_pgd), -1) == y)) == 1.0
  assert float(jnp.mean(jnp.argmax(logits_fn(x_sq), -1) == y)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.3)])
def test_square_respects_eps_and_box_and_is_deterministic(norm, eps):
  logits_fn, _ = linear_model()
  x = images(6)  # full [0, 1] range, so clipping at 0 and 1 matters
  y = jnp.argmax(logits_fn(x), -1)
  run = jax.jit(lambda key: square(logits_fn, x, y, key=key, eps=eps, norm=norm, n_queries=60))
  x_adv = run(jax.random.key(3))
  norms = core.check_adversarial(x_adv, x, eps, norm)
  assert norms.max() > 0.5 * eps  # it does perturb
  np.testing.assert_array_equal(x_adv, run(jax.random.key(3)))
  assert not np.array_equal(x_adv, run(jax.random.key(4)))


def test_square_spends_exactly_n_queries_on_an_unbreakable_model():
  calls = []

  def count(x):
    calls.append(x.shape[0])
    return np.tile(np.array([[100.0, 0.0, 0.0]], np.float32), (x.shape[0], 1))

  def logits_fn(x):  # class 0 whatever the input; counts its forward passes
    return io_callback(count, jax.ShapeDtypeStruct((x.shape[0], 3), jnp.float32),
                                        x)
  x = images(2)
  square(logits_fn, x, jnp.zeros(2, jnp.int32), key=jax.random.key(0), eps=0.1,
         n_queries=7)
  assert len(calls) == 7


def test_square_stops_when_every_point_is_fooled():
  calls = []

  def count(x):
    calls.append(1)
    return np.tile(np.array([[0.0, 1.0]], np.float32), (x.shape[0], 1))

  def logits_fn(x):  # always class 1: label 0 is fooled at the starting point
    return io_callback(count, jax.ShapeDtypeStruct((x.shape[0], 2), jnp.float32),
                                        x)
  square(logits_fn, images(2), jnp.zeros(2, jnp.int32), key=jax.random.key(0), eps=0.1,
         n_queries=50)
  assert len(calls) == 1


def _reference_eta(s):
  """Numpy port of the reference's eta(s) (fra31/auto-attack square.py), without transposition."""
  def rectangles(x, y):
    delta = np.zeros([x, y])
    x_c, y_c = x // 2 + 1, y // 2 + 1
    top, left = x_c - 1, y_c - 1
    for k in range(max(x_c, y_c)):
      delta[max(top, 0):min(top + 2 * k + 1, x), max(0, left):min(left + 2 * k + 1, y)] += (
          1.0 / (k + 1) ** 2)
      top, left = top - 1, left - 1
    return delta / np.sqrt((delta ** 2).sum())
  delta = np.zeros([s, s])
  delta[:s // 2] = rectangles(s // 2, s)
  delta[s // 2:] = -rectangles(s - s // 2, s)
  return delta / np.sqrt((delta ** 2).sum())


@pytest.mark.parametrize("s", [3, 6, 11])
def test_eta_block_matches_reference_construction(s):
  top, left = jnp.array([1, 4]), jnp.array([2, 16 - s])
  rows, cols, inside = _window(top, left, jnp.int32(s), 16, 16)
  eta = np.asarray(_eta(rows, cols, inside, jnp.int32(s), jnp.array([False, True])))
  np.testing.assert_allclose(eta[0, 1:1 + s, 2:2 + s], _reference_eta(s), atol=1e-6)
  np.testing.assert_allclose(eta[1, 4:4 + s, 16 - s:], _reference_eta(s).T, atol=1e-6)
  assert np.count_nonzero(eta[0]) == np.count_nonzero(_reference_eta(s))  # zero elsewhere


def test_p_schedule_halves_at_the_reference_thresholds():
  p = lambda i, n=10000, rescale=False: pytest.approx(float(p_schedule(i, n, 0.8, rescale)))
  assert 0.8 == p(0) == p(10)
  assert 0.4 == p(11) == p(50)
  assert 0.1 == p(201)
  assert 0.8 / 512 == p(8001)
  assert 0.4 == p(2, n=1000, rescale=True)  # 2 / 1000 of the way = iteration 20 of 10,000


def pixel_detector(x):
  """Class 1 iff some pixel's red channel exceeds 0.9: one pixel can flip it."""
  score = jnp.max(x[..., 0].reshape(x.shape[0], -1), axis=1)
  return jnp.stack([jnp.full_like(score, 0.9), score], axis=1)


@pytest.mark.parametrize("pixels", [1, 2])
def test_onepixel_changes_at_most_pixels_and_finds_the_pixel(pixels):
  x = images(4, high=0.5)
  y = jnp.zeros(4, jnp.int32)
  run = jax.jit(lambda key: onepixel(pixel_detector, x, y, key=key, pixels=pixels,
                                     population=20, iterations=10, chunk_size=10))
  x_adv = run(jax.random.key(0))
  core.check_adversarial(x_adv, x, 1.0, "linf")
  changed = np.any(np.asarray(x_adv) != np.asarray(x), axis=-1).reshape(4, -1).sum(1)
  assert changed.max() <= pixels and changed.min() >= 1
  assert np.all(np.argmax(pixel_detector(x_adv), -1) == 1)
  np.testing.assert_array_equal(x_adv, run(jax.random.key(0)))
  assert not np.array_equal(x_adv, run(jax.random.key(1)))


def test_onepixel_reports_no_success_on_a_model_no_pixel_can_flip():
  x = images(3)
  y = jnp.zeros(3, jnp.int32)
  # Class 0 unless the whole image is bright: one pixel moves the mean by at most 1/64.
  mean_model = lambda v: jnp.stack([jnp.full(len(v), 0.9), v.mean(axis=(1, 2, 3))], axis=1)
  x_adv = onepixel(mean_model, x, y, key=jax.random.key(0), population=8, iterations=3,
                   chunk_size=4)
  assert np.all(np.argmax(mean_model(x_adv), -1) == y)
  changed = np.any(np.asarray(x_adv) != np.asarray(x), axis=-1).reshape(3, -1).sum(1)
  assert changed.max() <= 1


@pytest.mark.parametrize("bad", [dict(eps=-0.1), dict(eps=1.5), dict(eps=0.1, norm="l1"),
                                 dict(eps=0.1, n_queries=0), dict(eps=0.1, loss="dlr")])
def test_square_rejects_bad_arguments(bad):
  logits_fn, _ = linear_model()
  x = images(2)
  with pytest.raises(ValueError):
    square(logits_fn, x, jnp.zeros(2, jnp.int32), key=jax.random.key(0), **bad)


def test_blackbox_attacks_reject_images_outside_unit_box():
  logits_fn, _ = linear_model()
  x = images(2) * 2.0
  y = jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    square(logits_fn, x, y, key=jax.random.key(0), eps=0.1)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    onepixel(logits_fn, x, y, key=jax.random.key(0))


def test_square_queries_only_the_points_still_robust():
  calls = []

  def count(x):
    calls.append(x.shape[0])
    return np.tile(np.array([[100.0, 0.0, 0.0]], np.float32), (x.shape[0], 1))

  def logits_fn(x):  # class 0 whatever the input: label 0 is unbreakable, the others fooled
    return io_callback(count, jax.ShapeDtypeStruct((x.shape[0], 3), jnp.float32), x)
  y = jnp.asarray([1, 1, 0, 1, 1, 1, 1, 1], jnp.int32)
  x = images(8)
  x_adv = square(logits_fn, x, y, key=jax.random.key(0), eps=0.1, n_queries=6)
  # The starting point is queried for the whole batch, then only the one robust point.
  assert calls == [8] + [1] * 5
  core.check_adversarial(x_adv, x, 0.1, "linf")


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 6 / 255), ("l2", 0.5)])
def test_square_compaction_changes_no_result(norm, eps):
  """Querying only the robust points (compact) gives, per example, the search of the whole
  batch: the premise is a mix of points fooled early, late and never."""
  logits_fn, _ = linear_model()
  x = images(13)
  y = jnp.argmax(logits_fn(x), -1)

  def run(compact):
    return np.asarray(jax.jit(lambda x: square(logits_fn, x, y, key=jax.random.key(5), eps=eps,
                                                norm=norm, n_queries=150, compact=compact))(x))
  compacted, whole = run(True), run(False)
  fooled = np.asarray(jnp.argmax(logits_fn(compacted), -1) != y)
  assert 0 < fooled.sum() < len(y), fooled
  np.testing.assert_array_equal(fooled, np.asarray(jnp.argmax(logits_fn(whole), -1) != y))
  # A row's place in the slice changes the model's float rounding (1e-7), which the l2
  # proposals' renormalisation carries into the pixels: equal to 1e-4, not bit for bit.
  np.testing.assert_allclose(compacted, whole, atol=1e-4)


def test_square_search_of_an_example_does_not_depend_on_the_other_rows():
  logits_fn, _ = linear_model()
  x = images(6)
  y = jnp.argmax(logits_fn(x), -1)
  run = jax.jit(lambda x, y: square(logits_fn, x, y, key=jax.random.key(2), eps=6 / 255,
                                    n_queries=80))
  full = np.asarray(run(x, y))
  # Rows 0-2 beside other images: points fooled at other times change the slices the search
  # runs on, not rows 0-2's search.
  other = x.at[3:].set(images(3, seed=9))
  np.testing.assert_allclose(np.asarray(run(other, y))[:3], full[:3], atol=1e-6)

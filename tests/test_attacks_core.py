"""Shared attack plumbing: losses, norms, projections, starts, checks, eps parsing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax.attacks import core

# Two examples, four classes: the first misclassified (true class 0 is the smallest logit), the
# second correctly classified.
LOGITS = jnp.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
Y = jnp.array([0, 0])


def test_losses_match_hand_computed_values():
  log_sum_exp = math.log(sum(math.exp(v) for v in (1, 2, 3, 4)))
  np.testing.assert_allclose(core.ce_loss(LOGITS, Y), [log_sum_exp - 1, log_sum_exp - 4],
                             rtol=1e-6)
  # DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).
  np.testing.assert_allclose(core.dlr_loss(LOGITS, Y), [-(1 - 4) / (4 - 2), -(4 - 3) / (4 - 2)],
                             rtol=1e-6)
  np.testing.assert_allclose(core.margin_loss(LOGITS, Y), [3.0, -1.0])
  # Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  np.testing.assert_allclose(core.targeted_dlr_loss(LOGITS, Y, jnp.array([1, 3])),
                             [-(1 - 2) / (4 - 1.5), -(4 - 1) / (4 - 1.5)], rtol=1e-6)
  assert set(core.LOSSES) == {"ce", "dlr", "margin"}


def test_dlr_is_invariant_to_shift_and_scale():
  logits = jax.random.normal(jax.random.key(0), (5, 10))
  y = jnp.arange(5)
  np.testing.assert_allclose(core.dlr_loss(3.0 * logits + 7.0, y), core.dlr_loss(logits, y),
                             rtol=1e-4)


def test_losses_need_enough_classes_and_known_names():
  with pytest.raises(ValueError, match="3 classes"):
    core.dlr_loss(jnp.zeros((2, 2)), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="4 classes"):
    core.targeted_dlr_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([1, 2]))
  with pytest.raises(ValueError, match="Unknown loss"):
    core.resolve_loss("hinge")


def test_loss_and_grad_gives_per_example_gradients():
  w = jax.random.normal(jax.random.key(0), (12, 4))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jax.random.uniform(jax.random.key(1), (3, 2, 2, 3))
  y = jnp.array([0, 1, 2])
  loss, logits, grad = core.loss_and_grad(logits_fn, core.ce_loss)(x, y)
  for i in range(3):
    single = jax.grad(lambda v: core.ce_loss(logits_fn(v), y[i:i + 1])[0])(x[i:i + 1])
    np.testing.assert_allclose(grad[i:i + 1], single, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, core.ce_loss(logits, y))


def test_is_better_prefers_fooling_then_loss():
  better = core.is_better(loss=jnp.array([0.0, 5.0, 2.0, 1.0]),
                          fooled=jnp.array([True, False, True, False]),
                          best_loss=jnp.array([5.0, 0.0, 1.0, 2.0]),
                          best_fooled=jnp.array([False, True, True, False]))
  np.testing.assert_array_equal(better, [True, False, True, False])


def test_lp_norm_values_and_safe_gradient_at_zero():
  v = jnp.array([[3.0, -4.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
  np.testing.assert_allclose(core.lp_norm(v, "linf"), [4.0, 0.0])
  np.testing.assert_allclose(core.lp_norm(v, "l2"), [5.0, 0.0])
  np.testing.assert_allclose(core.lp_norm(v, "l1"), [7.0, 0.0])
  grad = jax.grad(lambda u: jnp.sum(core.lp_norm(u, "l2")))(v)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0].ravel(), [0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.3), ("l1", 1.0)])
def test_project_is_idempotent_and_inside_ball_and_box(norm, eps):
  key_x, key_d = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(key_x, (6, 4, 4, 1))
  x_far = x + 0.5 * jax.random.normal(key_d, x.shape)
  projected = core.project(x_far, x, eps, norm)
  np.testing.assert_allclose(core.project(projected, x, eps, norm), projected, atol=1e-6)
  assert np.all(np.asarray(core.lp_norm(projected - x, norm)) <= eps + 1e-5)
  assert float(projected.min()) >= 0.0 and float(projected.max()) <= 1.0
  core.check_adversarial(projected, x, eps, norm)
  # Points already inside the ball and box do not move.
  inside = core.project(x + 0.01 * (projected - x), x, eps, norm)
  np.testing.assert_allclose(inside, x + 0.01 * (projected - x), atol=1e-6)


def test_project_l1_is_the_euclidean_projection():
  # Away from the box edges, the projection onto the l1 ball is sign(d) * max(|d| - theta, 0)
  # with theta found by bisection so that the l1 norm equals eps.
  x = jnp.full((1, 4, 4, 1), 0.5)
  delta = 0.1 * jax.random.normal(jax.random.key(3), x.shape)
  eps = 0.3
  d = np.abs(np.asarray(delta, np.float64).ravel())
  lo, hi = 0.0, d.max()
  for _ in range(100):
    theta = 0.5 * (lo + hi)
    lo, hi = (theta, hi) if np.maximum(d - theta, 0).sum() > eps else (lo, theta)
  expected = np.sign(np.asarray(delta).ravel()) * np.maximum(d - theta, 0)
  projected = core.project(x + delta, x, eps, "l1") - x
  np.testing.assert_allclose(np.asarray(projected).ravel(), expected, atol=1e-6)


def test_project_accepts_per_example_eps():
  x = jnp.full((2, 2, 2, 1), 0.5)
  projected = core.project(x + 0.4, x, jnp.array([0.1, 0.2]), "linf")
  np.testing.assert_allclose(core.lp_norm(projected - x, "linf"), [0.1, 0.2], rtol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_steepest_ascent_direction(norm):
  grad = jnp.array([[3.0, -4.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
  direction = core.steepest_ascent_direction(grad, norm)
  expected = [[1.0, -1.0], [0.0, 0.0]] if norm == "linf" else [[0.6, -0.8], [0.0, 0.0]]
  np.testing.assert_allclose(direction.reshape(2, 2), expected, rtol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_inside_ball_and_box_and_on_sphere(norm):
  x = jax.random.uniform(jax.random.key(0), (64, 4, 4, 1), minval=0.2, maxval=0.8)
  eps = 0.1
  start = core.random_init(jax.random.key(1), x, eps, norm)
  core.check_adversarial(start, x, eps, norm)
  radius = np.asarray(core.lp_norm(start - x, norm))
  assert radius.min() < 0.9 * eps  # l2 radii are spread, not all on the surface
  on_sphere = core.random_init(jax.random.key(1), x, eps, norm, on_sphere=True)
  np.testing.assert_allclose(core.lp_norm(on_sphere - x, norm), eps, rtol=1e-5)
  assert not np.array_equal(start, core.random_init(jax.random.key(2), x, eps, norm))


def test_check_images():
  good = jnp.full((2, 4, 4, 3), 0.5)
  core.check_images(good)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    core.check_images(good * 300)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    core.check_images(good - 1.0)
  with pytest.raises(ValueError, match="4-D"):
    core.check_images(good[0])
  with pytest.raises(ValueError, match="floating"):
    core.check_images(np.zeros((2, 4, 4, 3), np.uint8))
  jax.jit(lambda v: core.check_images(v) or v)(good)  # traced: shape and dtype only


def test_check_eps():
  core.check_eps(8 / 255, "linf")
  core.check_eps(2.0, "l2")  # l2 radii may exceed 1
  for eps, norm, message in [(-0.1, "linf", ">= 0"), (1.5, "linf", "<= 1"),
                             (float("nan"), "l2", "finite"), (0.1, "l7", "norm"),
                             (0.1, "l1", "norm")]:
    with pytest.raises(ValueError, match=message):
      core.check_eps(eps, norm)


def test_check_adversarial_reports_violations():
  x = jnp.full((3, 2, 2, 1), 0.5)
  ok = x.at[:, 0, 0, 0].add(0.03)
  np.testing.assert_allclose(core.check_adversarial(ok, x, 0.03, "linf"), 0.03, rtol=1e-5)
  with pytest.raises(ValueError, match="1 of 3 .* exceed linf"):
    core.check_adversarial(ok.at[1, 1, 1, 0].add(0.1), x, 0.03, "linf")
  with pytest.raises(ValueError, match="2 of 3 .* leave"):
    core.check_adversarial(ok.at[:2, 0, 1, 0].set(1.2), x, 1.0, "l2")
  with pytest.raises(ValueError, match="shape"):
    core.check_adversarial(ok[:2], x, 0.03, "linf")


def test_parse_eps():
  assert core.parse_eps("8/255") == 8 / 255
  assert core.parse_eps(" 0.5 ") == 0.5
  assert core.parse_eps("0") == 0.0
  assert core.parse_eps_list("0,1/255, 8/255") == [0.0, 1 / 255, 8 / 255]
  for bad in ["8/0", "eight", "", "-1/255", "inf", "1/2/3"]:
    with pytest.raises(ValueError, match="eps"):
      core.parse_eps(bad)
  with pytest.raises(ValueError, match="empty"):
    core.parse_eps_list("1/255,,2/255")

"""Minimum-norm attacks (DeepFool, CW-L2, EAD, FAB, FAB-T) on linear classifiers.

For logits z = flatten(x) @ W + b and a point well inside the [0, 1] box, the smallest
perturbation in norm p that makes class j beat the label y is margin_j / ||w_y - w_j||_q (q the
dual norm: l2 -> l2, linf -> l1, l1 -> linf), and the minimal adversarial norm is the minimum
over j. The attacks must find it within a few percent and never beat it.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax.attacks import cw, deepfool, ead, fab

BATCH, SHAPE, NUM_CLASSES = 6, (4, 4, 1), 5
DIM = int(np.prod(SHAPE))
DUAL_ORD = {"l2": 2, "linf": 1, "l1": np.inf}
NORM_ORD = {"l2": 2, "linf": np.inf, "l1": 1}


def linear_problem(norm, seed=0):
  """A 5-class linear model and 6 points near 0.5 whose minimal `norm` distances are ~0.05-0.15.

  Returns (logits_fn, x, y, minimal distance per example).
  """
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(DIM, NUM_CLASSES))
  # Class 0 wins at the centre; class j's boundary is r_j in `norm` away, r_j in [0.05, 0.15].
  offsets = [0.0] + [-rng.uniform(0.05, 0.15) * np.linalg.norm(weights[:, 0] - weights[:, j],
                                                             ord=DUAL_ORD[norm])
                     for j in range(1, NUM_CLASSES)]
  bias = -0.5 * weights.sum(axis=0) + np.asarray(offsets)
  x = np.clip(rng.normal(0.5, 0.01, size=(BATCH,) + SHAPE), 0, 1).astype(np.float32)
  logits = x.reshape(BATCH, -1) @ weights + bias
  y = logits.argmax(axis=1)
  minimal = np.array([
      min((logits[i, y[i]] - logits[i, j])
          / np.linalg.norm(weights[:, y[i]] - weights[:, j], ord=DUAL_ORD[norm])
          for j in range(NUM_CLASSES) if j != y[i])
      for i in range(BATCH)])
  w32, b32 = jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)
  logits_fn = lambda v: v.reshape(v.shape[0], -1) @ w32 + b32
  return logits_fn, jnp.asarray(x), jnp.asarray(y, jnp.int32), minimal


def run(attack, logits_fn, x, y, **kwargs):
  return np.asarray(jax.jit(lambda x, y: attack(logits_fn, x, y, **kwargs))(x, y))


def norms(x_adv, x, norm):
  return np.linalg.norm((np.asarray(x_adv, np.float64) - np.asarray(x)).reshape(len(x), -1),
                        ord=NORM_ORD[norm], axis=1)


def assert_adversarial(logits_fn, x_adv, y):
  chex.assert_shape(x_adv, (BATCH,) + SHAPE)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  np.testing.assert_array_equal(np.asarray(logits_fn(jnp.asarray(x_adv))).argmax(1) == y, False)


def assert_near_minimal(found, minimal, rtol):
  ratio = found / minimal
  assert np.all(ratio >= 1 - 1e-4), f"below the closed-form minimum: {ratio}"
  assert np.all(ratio <= 1 + rtol), f"not within {rtol:.0%} of the minimum: {ratio}"


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_onto_hyperplane_in_box_matches_bisection(norm):
  rng = np.random.default_rng(1)
  num, dim = 40, 6
  t = rng.uniform(0, 1, (num, dim))
  w = rng.normal(size=(num, dim)) * (rng.uniform(size=(num, dim)) > 0.2)  # some w_i = 0
  # Offsets on both sides of t, some beyond the box's reach (then d goes to the box corner).
  b = (w * t).sum(1) + rng.normal(size=num)
  d = np.asarray(fab.project_onto_hyperplane_in_box(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
      norm))
  # Independent solution: optimal moves are sign(w_i) min(lam * rate_i, room_i); bisect on lam.
  for i in range(num):
    side = np.sign(b[i] - w[i] @ t[i])
    room = np.where(side * w[i] > 0, 1 - t[i], t[i])
    rate = np.abs(w[i]) if norm == "l2" else np.ones(dim)
    move = lambda lam: side * np.sign(w[i]) * np.minimum(lam * rate, room)
    lo, hi = 0.0, 1e9  # beyond every breakpoint, so the infeasible case ends at the corner
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if side * (w[i] @ move(mid)) < side * (b[i] - w[i] @ t[i]) else (lo, mid)
    np.testing.assert_allclose(d[i], move(hi), atol=1e-4)
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_finds_minimal_perturbation(norm):
  logits_fn, x, y, minimal = linear_problem(norm)
  x_adv = run(deepfool.deepfool, logits_fn, x, y, norm=norm)
  assert_adversarial(logits_fn, x_adv, y)
  # One exact jump on a linear model, scaled by 1 + overshoot (0.02).
  assert_near_minimal(norms(x_adv, x, norm), minimal, rtol=0.03)


def test_cw_l2_finds_minimal_perturbation():
  logits_fn, x, y, minimal = linear_problem("l2")
  x_adv = run(cw.cw_l2, logits_fn, x, y, steps=200)
  assert_adversarial(logits_fn, x_adv, y)
  assert_near_minimal(norms(x_adv, x, "l2"), minimal, rtol=0.02)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_finds_minimal_perturbation(norm):
  logits_fn, x, y, minimal = linear_problem(norm)
  x_adv = run(fab.fab, logits_fn, x, y, key=jax.random.key(0), norm=norm, steps=30)
  assert_adversarial(logits_fn, x_adv, y)
  assert_near_minimal(norms(x_adv, x, norm), minimal, rtol=0.02)


def test_ead_approaches_minimal_l1_and_follows_its_decision_rule():
  logits_fn, x, y, minimal = linear_problem("l1")
  # Reference beta (1e-3) makes EAD mostly an L2 attack: its L1 is above the minimum, not far.
  x_ref = run(ead.ead, logits_fn, x, y, decision_rule="L1", steps=200)
  assert_adversarial(logits_fn, x_ref, y)
  assert_near_minimal(norms(x_ref, x, "l1"), minimal, rtol=0.5)
  # A stronger L1 weight (and the reference's 1000 steps) gets within a few percent.
  x_l1 = run(ead.ead, logits_fn, x, y, decision_rule="L1", beta=0.02)
  assert_adversarial(logits_fn, x_l1, y)
  assert_near_minimal(norms(x_l1, x, "l1"), minimal, rtol=0.05)
  # The EN rule keeps a point with smaller elastic-net distance, paying in L1.
  x_en = run(ead.ead, logits_fn, x, y, decision_rule="EN", beta=0.02)
  assert_adversarial(logits_fn, x_en, y)
  elastic_net = lambda v: norms(v, x, "l2") ** 2 + 0.02 * norms(v, x, "l1")
  assert np.all(elastic_net(x_en) <= elastic_net(x_l1) + 1e-6)
  assert np.all(norms(x_l1, x, "l1") <= norms(x_en, x, "l1") + 1e-6)


def two_boundaries_problem():
  """Class 0 at x = 0.5; class 1 has the larger logit (-0.2) but its boundary is 0.2 away along
  pixel 0; class 2 (logit -0.5) is 0.1 away along pixel 1 (in l2 and linf alike)."""
  weights = np.zeros((DIM, 3), np.float32)
  weights[0, 1], weights[1, 2] = 1.0, 5.0
  bias = jnp.asarray([0.0, -0.2, -0.5]) - 0.5 * jnp.asarray(weights.sum(axis=0))
  logits_fn = lambda v: v.reshape(v.shape[0], -1) @ jnp.asarray(weights) + bias
  x = jnp.full((BATCH,) + SHAPE, 0.5, jnp.float32)
  return logits_fn, x, jnp.zeros((BATCH,), jnp.int32)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_targeted_reaches_its_target_class(norm):
  logits_fn, x, y = two_boundaries_problem()
  predict = lambda v: np.asarray(logits_fn(jnp.asarray(v))).argmax(1)
  attack = functools.partial(run, fab.fab, logits_fn, x, y, key=jax.random.key(0), norm=norm,
                             steps=30, targeted=True)
  # FAB-T's first target is the runner-up logit, class 1 (0.2 away), although class 2 is nearer.
  # At a fixed eps (here per example) only perturbations within eps come back, else x.
  eps = jnp.asarray([0.15] * (BATCH // 2) + [0.25] * (BATCH // 2))
  runner_up = attack(num_targets=1, eps=eps, compact=False)
  np.testing.assert_array_equal(runner_up[:BATCH // 2], x[:BATCH // 2])
  np.testing.assert_array_equal(predict(runner_up[BATCH // 2:]), 1)
  np.testing.assert_allclose(norms(runner_up, x, norm)[BATCH // 2:], 0.2, rtol=0.02)
  # compact (the default) stops a point at its first success within eps: same points fooled,
  # the example within eps but not shrunk further.
  first = attack(num_targets=1, eps=eps)
  np.testing.assert_array_equal(first[:BATCH // 2], x[:BATCH // 2])
  np.testing.assert_array_equal(predict(first[BATCH // 2:]), 1)
  assert np.all((norms(first, x, norm)[BATCH // 2:] >= 0.2 * 0.98)
                & (norms(first, x, norm)[BATCH // 2:] <= 0.25 + 1e-6))
  # With two targets the per-example best is the nearer class 2.
  best = attack(num_targets=2)
  np.testing.assert_array_equal(predict(best), 2)
  np.testing.assert_allclose(norms(best, x, norm), 0.1, rtol=0.02)


def test_fab_restarts_are_reproducible_and_never_worse():
  logits_fn, x, y, minimal = linear_problem("linf", seed=3)
  attack = lambda restarts: jax.jit(lambda key: fab.fab(logits_fn, x, y, key=key, norm="linf",
                                                        steps=10, n_restarts=restarts))
  with_restarts = attack(3)
  first, again = with_restarts(jax.random.key(7)), with_restarts(jax.random.key(7))
  chex.assert_trees_all_equal(first, again)
  single = attack(1)(jax.random.key(7))
  assert np.all(norms(first, x, "linf") <= norms(single, x, "linf") + 1e-7)
  assert np.all(norms(first, x, "linf") >= minimal * (1 - 1e-4))


ATTACKS = {
    "deepfool": functools.partial(deepfool.deepfool, steps=5),
    "cw": functools.partial(cw.cw_l2, steps=20, binary_search_steps=2),
    "ead": functools.partial(ead.ead, steps=20, binary_search_steps=2),
    "fab": functools.partial(fab.fab, key=jax.random.key(0), steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_returns_x_where_no_perturbation_is_needed_or_found(name):
  # A model that ignores its input: example 0's label is already wrong (minimal norm 0), the
  # others are right and no perturbation can change that.
  constant = lambda v: jnp.asarray([0.0, -1.0, -1.0, -1.0, -1.0]) + 0.0 * v[:, 0, 0, :1]
  _, x, _, _ = linear_problem("l2")
  y = jnp.zeros((BATCH,), jnp.int32).at[0].set(1)
  np.testing.assert_array_equal(run(ATTACKS[name], constant, x, y), x)


@pytest.mark.parametrize("call, message", [
    (lambda f, x, y: deepfool.deepfool(f, x, y, norm="l1"), "norm"),
    (lambda f, x, y: fab.fab(f, x, y, key=jax.random.key(0), norm="l0"), "norm"),
    (lambda f, x, y: fab.fab(f, x, y, key=jax.random.key(0), eps=-0.1), "eps"),
    (lambda f, x, y: ead.ead(f, x, y, decision_rule="L2"), "decision_rule"),
    (lambda f, x, y: cw.cw_l2(f, x, y, steps=0), "steps"),
    (lambda f, x, y: cw.cw_l2(f, x, y, abort_early="sometimes"), "abort_early"),
    (lambda f, x, y: ead.ead(f, x, y, abort_early=1), "abort_early"),
    (lambda f, x, y: cw.cw_l2(f, x * 255.0, y), r"\[0, 1\]"),
])
def test_bad_arguments_raise_clear_errors(call, message):
  logits_fn, x, y, _ = linear_problem("l2")
  with pytest.raises(ValueError, match=message):
    call(logits_fn, x, y)


def stalling_pair(abort_early):
  """const_search on a scripted 2-point batch: point 0's objective never drops and it is fooled
  only from iteration 10 on; point 1's objective halves each step and it is fooled from the
  start. Candidates move 0.1 further from x each iteration. Returns the kept distances [2]."""
  x = jnp.zeros((2, 1, 1, 1))
  y = jnp.zeros((2,), jnp.int32)

  def step(state, const, i, active):
    del const, active
    x_cand = jnp.full_like(x, 0.1 * (i + 1))
    fooled = jnp.stack([i >= 10, True])
    logits = jnp.where(fooled[:, None], jnp.asarray([[0.0, 1.0]]), jnp.asarray([[1.0, 0.0]]))
    objective = jnp.stack([1.0, 100.0 * 0.5 ** i])
    return state, x_cand, logits, objective

  x_adv = jax.jit(lambda: cw.const_search(
      x, y, jnp.asarray([[1.0, 0.0]] * 2), init_state=lambda: (), step=step,
      distance=cw.squared_l2, binary_search_steps=1, initial_const=1.0, steps=20,
      confidence=0.0, abort_early=abort_early))()
  return np.asarray(x_adv).reshape(2)


def test_default_early_abort_is_the_references_whole_batch_rule():
  # The batch's summed objective keeps dropping (point 1), so point 0 runs on and is fooled at
  # iteration 10, as in the reference, foolbox and torchattacks.
  np.testing.assert_allclose(stalling_pair("batch"), [1.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(stalling_pair(True), stalling_pair("batch"))
  np.testing.assert_allclose(stalling_pair(False), stalling_pair("batch"))
  # The per-example opt-in stops point 0 at the first check after its objective stalled
  # (iteration 2), before it is fooled: faster and weaker.
  np.testing.assert_allclose(stalling_pair("per_example"), [0.0, 0.1], rtol=1e-6)

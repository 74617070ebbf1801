"""Gradient attacks (FGSM, PGD, APGD, APGD-T) on linear models whose answers are known."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd, apgd_t, checkpoint_iterations, start_points
from gfa_jax.attacks.fab import fab
from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.attacks.pgd import pgd

SHAPE = (4, 4, 1)
DIM = 16
FAR = 10.0  # logit of the unreachable classes of the two-sided model


def linear_model(w, b):
  """logits = flatten(x) @ w + b."""
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def two_sided_model(seed=0, num_classes=4):
  """Logits [s, -s, -FAR, ...] with s = v.(x - 0.5) + 0.05: a binary problem in disguise.

  Only classes 0 and 1 can win, and every loss here (CE, DLR, margin, targeted DLR) has its
  gradient along +-v, so gradient attacks can find the exact boundary. The distance of x to it is
  margin / ||w_0 - w_1|| = |s| / ||v||_1 in Linf and |s| / ||v||_2 in L2.
  """
  v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
  w = np.zeros((DIM, num_classes), np.float32)
  w[:, 0], w[:, 1] = v, -v
  b = np.full(num_classes, -FAR, np.float32)
  b[0], b[1] = -v.sum() * 0.5 + 0.05, v.sum() * 0.5 - 0.05
  return linear_model(jnp.asarray(w), jnp.asarray(b)), v


def images(batch, seed=1, low=0.35, high=0.65):
  """Images kept away from the [0, 1] edges so that clipping never binds."""
  x = np.random.default_rng(seed).uniform(low, high, size=(batch,) + SHAPE)
  return jnp.asarray(x, jnp.float32)


def wiggly_model(seed=4, num_classes=4, hidden=8, scale=8.0):
  """A small random tanh network: attack outputs depend on the random start."""
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(DIM, hidden)) * scale, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(hidden, num_classes)), jnp.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 4.0) @ w2


def robust_accuracy(logits_fn, x_adv, y):
  """From a clean forward pass of the returned images, never from attack bookkeeping."""
  return float(jnp.mean(jnp.argmax(logits_fn(x_adv), axis=-1) == y))


def boundary_setup(norm, num_classes=4, batch=8):
  """Per-example eps 10% beyond / 10% short of each point's distance to the boundary."""
  logits_fn, v = two_sided_model(num_classes=num_classes)
  # Move random points along v so that s = +-0.1 ... +-0.5: both classes, no point on the boundary.
  s_wanted = np.linspace(0.1, 0.5, batch) * np.resize([1.0, -1.0], batch)
  x = images(batch, low=0.4, high=0.6)
  s_now = np.asarray(logits_fn(x))[:, 0]
  x = x + ((s_wanted - s_now)[:, None] * v[None] / (v @ v)).reshape((batch,) + SHAPE)
  assert 0.3 < float(x.min()) and float(x.max()) < 0.7
  y = jnp.argmax(logits_fn(x), axis=-1)
  dist = np.abs(s_wanted) / np.linalg.norm(v, ord=1 if norm == "linf" else 2)
  assert dist.max() < 0.25  # the ball stays inside the box, so clipping never binds
  x2, y2 = jnp.concatenate([x, x]), jnp.concatenate([y, y])
  eps = jnp.asarray(np.concatenate([1.1 * dist, 0.9 * dist]), jnp.float32)
  return logits_fn, x2, y2, eps, batch


ATTACKS = {
    "pgd-ce": functools.partial(pgd, loss="ce", steps=10),
    "pgd-dlr": functools.partial(pgd, loss="dlr", steps=10),
    "apgd-ce": functools.partial(apgd, loss="ce", steps=10, n_restarts=2),  # restarts keep the best
    "apgd-dlr": functools.partial(apgd, loss="dlr", steps=10),
    "apgd-t": functools.partial(apgd_t, num_targets=3, steps=10),
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_crosses_boundary_exactly_when_eps_allows(name, norm):
  logits_fn, x, y, eps, n = boundary_setup(norm)
  attack = jax.jit(functools.partial(ATTACKS[name], logits_fn, norm=norm))
  x_adv = attack(x, y, key=jax.random.key(0), eps=eps)
  core.check_adversarial(x_adv, x, np.asarray(eps), norm)
  assert robust_accuracy(logits_fn, x_adv[:n], y[:n]) == 0.0  # eps beyond the boundary
  assert robust_accuracy(logits_fn, x_adv[n:], y[n:]) == 1.0  # eps short of it


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_the_analytic_step(norm):
  rng = np.random.default_rng(2)
  w = rng.normal(size=(DIM, 3)).astype(np.float32)
  b = rng.normal(size=3).astype(np.float32)
  x, y, eps = images(6), jnp.array([0, 1, 2, 0, 1, 2]), 0.05
  x_adv = fgsm(linear_model(w, b), x, y, eps=eps, norm=norm)

  # d CE / d x = W (softmax(z) - onehot(y)) for a linear model.
  flat = np.asarray(x, np.float64).reshape(6, -1)
  z = flat @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(3)[np.asarray(y)]) @ w.T
  if norm == "linf":
    step = np.sign(grad)
  else:
    step = grad / np.linalg.norm(grad, axis=1, keepdims=True)
  expected = np.clip(flat + eps * step, 0, 1).reshape(x.shape)
  np.testing.assert_allclose(x_adv, expected, atol=1e-6)


def test_pgd_keeps_a_fooling_iterate_over_a_higher_loss_one():
  # The loss rewards being classified correctly, so the steps walk away from the fooling start;
  # best-iterate selection must still return the fooling start.
  logits_fn, v = two_sided_model()
  x = images(4)
  y = jnp.argmax(logits_fn(x), axis=-1)
  dist = np.abs(np.asarray(logits_fn(x))[:, 0]) / np.abs(v).sum()
  eps = jnp.asarray(2 * dist, jnp.float32)
  sign = np.where(np.asarray(y) == 0, -1.0, 1.0)[:, None, None, None]
  x_init = x + eps[:, None, None, None] * sign * np.sign(v).reshape(SHAPE)
  assert robust_accuracy(logits_fn, x_init, y) == 0.0

  run = functools.partial(pgd, logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=5,
                          loss=lambda logits, y: -core.margin_loss(logits, y), x_init=x_init)
  assert robust_accuracy(logits_fn, run(keep_best=True), y) == 0.0
  assert robust_accuracy(logits_fn, run(keep_best=False), y) == 1.0


def test_pgd_callable_loss_receives_y_unchanged():
  # TRADES passes clean probabilities as y: the attack must accept them and stay within eps.
  logits_fn, _ = two_sided_model()
  x = images(4)
  p_clean = jax.nn.softmax(logits_fn(x))
  kl = lambda logits, p: jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits)), axis=-1)
  x_init = x + 0.001 * jax.random.normal(jax.random.key(1), x.shape)
  x_adv = pgd(logits_fn, x, p_clean, key=jax.random.key(0), eps=0.03, loss=kl, x_init=x_init)
  core.check_adversarial(x_adv, x, 0.03, "linf")
  assert float(jnp.mean(kl(logits_fn(x_adv), p_clean))) > float(jnp.mean(kl(logits_fn(x), p_clean)))


def test_pgd_inside_a_gradient_of_the_training_loss():
  # Adversarial training differentiates a loss at pgd's output wrt the parameters; the attack
  # itself must contribute no gradient (its output is data).
  x, y = images(4), jnp.array([0, 1, 0, 1])
  w0 = jnp.asarray(np.random.default_rng(3).normal(size=(DIM, 2)), jnp.float32)
  key = jax.random.key(0)

  def adversarial_loss(w):
    logits_fn = linear_model(w, 0.0)
    x_adv = pgd(logits_fn, x, y, key=key, eps=0.03, steps=3)
    return jnp.mean(core.ce_loss(logits_fn(x_adv), y)), x_adv

  grad, x_adv = jax.jit(jax.grad(adversarial_loss, has_aux=True))(w0)
  expected = jax.grad(lambda w: jnp.mean(core.ce_loss(linear_model(w, 0.0)(x_adv), y)))(w0)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def min_linf_eps_to_target(w, b, x, target):
  """Smallest Linf eps putting x (flat, in the box) into class `target` of a linear model (LP)."""
  dim, num_classes = w.shape
  cost = np.zeros(dim + 1)
  cost[-1] = 1.0  # variables: delta, eps
  rows, bounds_ub = [], []
  for j in range(num_classes):
    if j != target:  # z_j(x + delta) <= z_target(x + delta)
      rows.append(np.append(w[:, j] - w[:, target], 0.0))
      bounds_ub.append(-(w[:, j] - w[:, target]) @ x - (b[j] - b[target]))
  for i in range(dim):  # |delta_i| <= eps
    for sign in (1.0, -1.0):
      row = np.zeros(dim + 1)
      row[i], row[-1] = sign, -1.0
      rows.append(row)
      bounds_ub.append(0.0)
  box = [(-x[i], 1 - x[i]) for i in range(dim)] + [(0, None)]
  result = linprog(cost, A_ub=np.array(rows), b_ub=np.array(bounds_ub), bounds=box)
  assert result.success
  return result.fun


def test_apgd_t_reaches_the_least_likely_target_when_possible():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(DIM, 4)).astype(np.float32)
  b = np.zeros(4, np.float32)
  logits_fn = linear_model(jnp.asarray(w), jnp.asarray(b))
  x = images(6, low=0.3, high=0.7)
  logits = np.asarray(logits_fn(x))
  y, target = logits.argmax(1), logits.argmin(1)
  needed = np.array([min_linf_eps_to_target(w, b, np.asarray(x[i]).ravel(), target[i])
                     for i in range(len(x))])
  eps = jnp.asarray(1.25 * needed, jnp.float32)  # some slack: targeted DLR ignores third classes
  x_adv = apgd_t(logits_fn, x, jnp.asarray(y), key=jax.random.key(0), eps=eps,
                          y_target=jnp.asarray(target), steps=20)
  core.check_adversarial(x_adv, x, np.asarray(eps), "linf")
  np.testing.assert_array_equal(np.asarray(logits_fn(x_adv)).argmax(1), target)


def test_apgd_runs_exactly_the_requested_iterations():
  # Large L2 ball (2.0, where the box binds): CE on a linear model keeps rising for dozens of
  # iterations, by 0.36-0.48 from row 10 to the end; a silent cap at 10 iterations would leave
  # the trace flat after row 10. (At eps 0.5 it plateaus by row 10 to 1e-7.)
  logits_fn, _ = two_sided_model()
  x = images(4)
  y = jnp.argmax(logits_fn(x), axis=-1)
  steps = 37
  _, trace = apgd(logits_fn, x, y, key=jax.random.key(0), eps=2.0, norm="l2",
                           steps=steps, return_trace=True)
  chex.assert_shape(trace, (steps + 1, 4))
  assert np.all(np.diff(np.asarray(trace), axis=0) >= 0)
  assert np.all(trace[-1] > trace[10] + 0.1)


def reference_apgd_best_loss(loss_and_grad, x, x_start, eps, norm, steps, rho=0.75):
  """NumPy port of AutoAttack's APGDAttack.attack_single_run (Linf/L2), best loss per iteration.

  Line by line from fra31/auto-attack autoattack/autopgd_base.py, except that the first window's
  count of loss increases compares the first iterate with the start point (the reference reads
  an uninitialised zero there), as in the paper.
  """
  expand = lambda m: m.reshape(-1, 1, 1, 1)
  l2 = lambda v: np.sqrt((v ** 2).reshape(v.shape[0], -1).sum(1))
  normalize = lambda v: v / expand(l2(v) + 1e-12)
  if norm == "linf":
    project = lambda v: np.clip(np.minimum(np.maximum(v, x - eps), x + eps), 0.0, 1.0)
    direction = np.sign
  else:
    project = lambda v: np.clip(x + normalize(v - x) * np.minimum(eps, expand(l2(v - x))), 0, 1)
    direction = normalize
  window, min_window, shrink = (max(int(0.22 * steps), 1), max(int(0.06 * steps), 1),
                                max(int(0.03 * steps), 1))
  x_adv = x_start.copy()
  loss, grad = loss_and_grad(x_adv)
  x_best, grad_best, loss_best = x_adv.copy(), grad.copy(), loss.copy()
  losses, best_losses = [loss.copy()], [loss_best.copy()]
  step_size = 2.0 * eps * np.ones((len(x), 1, 1, 1))
  x_old, counter = x_adv.copy(), 0
  loss_best_last_check, reduced_last_check = loss_best.copy(), np.ones(len(x))
  for i in range(steps):
    grad2, x_old = x_adv - x_old, x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    x_1 = project(x_adv + step_size * direction(grad))
    x_adv = project(x_adv + (x_1 - x_adv) * a + grad2 * (1 - a))
    loss, grad = loss_and_grad(x_adv)
    losses.append(loss)
    better = loss > loss_best
    x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
    best_losses.append(loss_best.copy())
    counter += 1
    if counter == window:
      increases = sum(losses[-c - 1] > losses[-c - 2] for c in range(window))
      reduce = (increases <= window * rho) | (
          (1 - reduced_last_check) * (loss_best_last_check >= loss_best) > 0)
      reduced_last_check, loss_best_last_check = reduce.astype(float), loss_best.copy()
      step_size[reduce] /= 2.0
      x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
      window, counter = max(window - shrink, min_window), 0
  return np.stack(best_losses)


@pytest.mark.parametrize("norm, eps, loss", [("linf", 8 / 255, "ce"), ("l2", 0.5, "dlr")])
def test_apgd_matches_a_port_of_the_reference(norm, eps, loss):
  logits_fn = wiggly_model(num_classes=10, scale=0.5)
  x = images(8, low=0.0, high=1.0)
  y = jnp.argmax(logits_fn(x), axis=-1)
  key, steps = jax.random.key(0), 25  # 25 steps: windows 5, 4, 3, 2, 1, 1, ... many checks
  _, trace = apgd(logits_fn, x, y, key=key, eps=eps, norm=norm, loss=loss,
                           steps=steps, return_trace=True)
  grad_fn = jax.jit(lambda v: core.loss_and_grad(logits_fn, core.LOSSES[loss])(v, y))

  def loss_and_grad(v):
    value, _, grad = grad_fn(jnp.asarray(v, jnp.float32))
    return np.array(value), np.array(grad)

  start = start_points(jax.random.fold_in(key, 0), x, eps, norm)  # run 0
  expected = reference_apgd_best_loss(loss_and_grad, np.asarray(x), np.array(start), eps, norm,
                                      steps)
  np.testing.assert_allclose(trace, expected, rtol=1e-4, atol=1e-5)


def test_apgd_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  assert checkpoint_iterations(100) == [round(100 * q) for q in p[1:]]
  assert checkpoint_iterations(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("attack", [
    functools.partial(pgd, steps=3),
    functools.partial(apgd, steps=3, loss="dlr"),
    functools.partial(apgd_t, steps=3, num_targets=2),
], ids=["pgd", "apgd-dlr", "apgd-t"])
def test_same_key_same_output_and_one_compile_per_shape(attack):
  logits_fn = wiggly_model()
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x, y, key):
    return attack(logits_fn, x, y, key=key, eps=0.1)

  x = images(4)
  y = jnp.argmax(logits_fn(x), axis=-1)  # a misclassified point would return x for any key
  first = run(x, y, jax.random.key(0))
  np.testing.assert_array_equal(first, run(x, y, jax.random.key(0)))
  assert not np.array_equal(first, run(x, y, jax.random.key(1)))
  run(images(4, seed=5), jnp.array([1, 1, 0, 0]), jax.random.key(2))  # no retrace


@pytest.mark.parametrize("attack", [fgsm, pgd, apgd, apgd_t])
def test_bad_input_raises(attack):
  logits_fn, _ = two_sided_model()
  x, y, key = images(2), jnp.array([0, 1]), jax.random.key(0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    attack(logits_fn, x * 255, y, key=key, eps=0.03)
  with pytest.raises(ValueError, match="eps"):
    attack(logits_fn, x, y, key=key, eps=8.0)
  with pytest.raises(ValueError, match="norm"):
    attack(logits_fn, x, y, key=key, eps=0.03, norm="l0")


def test_apgd_t_rejects_more_targets_than_classes():
  logits_fn, _ = two_sided_model(num_classes=4)
  with pytest.raises(ValueError, match="num_targets"):
    apgd_t(logits_fn, images(2), jnp.array([0, 1]), key=jax.random.key(0), eps=0.03)


@pytest.mark.slow
def test_first_target_attacks_the_class_of_that_rank():
  """first_target=t (traced or not) runs the same iterates as naming the (2+t)-th class."""
  logits_fn = wiggly_model(num_classes=5)
  x = images(6)
  y = jnp.argmax(logits_fn(x), axis=-1)
  ranked = jnp.argsort(logits_fn(x), axis=-1)
  for t in (0, 2):
    _, by_rank = apgd_t(logits_fn, x, y, key=jax.random.key(0), eps=0.05, steps=8,
                        num_targets=1, first_target=jnp.asarray(t), return_trace=True)
    _, by_class = apgd_t(logits_fn, x, y, key=jax.random.key(0), eps=0.05, steps=8,
                         y_target=ranked[:, -2 - t], return_trace=True)
    chex.assert_trees_all_close(by_rank, by_class)


@pytest.mark.parametrize("attack", [
    functools.partial(apgd, steps=10),
    functools.partial(apgd_t, steps=10, num_targets=4),
    functools.partial(fab, targeted=True, steps=10, num_targets=4),
], ids=["apgd-ce", "apgd-t", "fab-t"])
def test_compact_steps_only_the_points_still_robust_and_fools_the_same_points(attack):
  """A point stops once it fools and later targets skip it (the reference's loop over the points
  still robust), with the robust mask of stepping every point every iteration."""
  logits_fn = wiggly_model(num_classes=5)
  x = images(256, seed=3)  # above the 64-row chunk, so that chunks can be skipped
  y = jnp.argmax(logits_fn(x), axis=-1)
  rows = []

  def counting(v):
    jax.debug.callback(lambda n: rows.append(int(n)), v.shape[0])
    return logits_fn(v)

  masks, work = {}, {}
  for compact in (False, True):
    rows.clear()
    x_adv = attack(counting, x, y, key=jax.random.key(1), eps=0.03, compact=compact)
    jax.effects_barrier()
    core.check_adversarial(x_adv, x, 0.03, "linf")
    masks[compact] = np.asarray(jnp.argmax(logits_fn(x_adv), axis=-1) == y)
    work[compact] = sum(rows)
  assert 0.05 < masks[True].mean() < 0.8  # some points fool, some survive
  np.testing.assert_array_equal(masks[True], masks[False])
  assert work[True] < 0.8 * work[False]

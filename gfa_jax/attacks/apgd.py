"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and targeted APGD-T.

Follows AutoAttack's reference implementation (fra31/auto-attack, autoattack/autopgd_base.py):
start on the eps-sphere, first step 2 * eps, momentum 0.75, and step-size halving at checkpoints
w_j ~ p_j * steps with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
(the reference's integer arithmetic, see `checkpoint_iterations`).
At a checkpoint the step size of an example halves, and it restarts from its best point, when
  (1) at most rho = 0.75 of the steps since the last checkpoint increased the loss, or
  (2) its step size was not halved at the last checkpoint and its best loss has not improved.
Every run takes exactly `steps` iterations (plus one gradient at the start point);
`return_trace=True` returns the per-iteration best loss, whose length proves it. The tests
check the trace against a line-by-line NumPy port of the reference's `attack_single_run`.

Differences from the reference, both deliberate:
  * the reference compares the first iterate's loss with an uninitialised 0 when counting
    successful steps for the first checkpoint; we compare it with the start point's loss, as
    the paper's condition (1) reads.
  * inside one call, runs are batched under jit, so restarts (and targets) attack every example,
    not only those still robust; the best point per example is kept across runs (a point that
    fools the model beats one that does not, then higher loss), and an example never fooled
    returns its highest-loss point instead of the clean image. Remaining runs are skipped once
    the whole batch is fooled. Evaluation and AutoAttack instead call APGD-T once per target
    through `core.run_per_target`, each on the points still robust, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax.attacks import core

LogitsFn = Callable[[jax.Array], jax.Array]


def checkpoint_iterations(steps: int) -> list[int]:
  """Iteration counts after which APGD checks its step size, e.g. [22, 41, 57, ..., 99] for 100.

  Integer arithmetic of the reference: the first window has max(int(0.22 * steps), 1)
  iterations, each next one max(int(0.03 * steps), 1) fewer, but at least
  max(int(0.06 * steps), 1).
  """
  window = max(int(0.22 * steps), 1)
  shrink = max(int(0.03 * steps), 1)
  min_window = max(int(0.06 * steps), 1)
  checkpoints, done = [], window
  while done <= steps:
    checkpoints.append(done)
    window = max(window - shrink, min_window)
    done += window
  return checkpoints


def _schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration i (0-based): is it the last of a window, and that window's length."""
  is_check = np.zeros(steps, bool)
  window = np.ones(steps, np.float32)
  previous = 0
  for c in checkpoint_iterations(steps):
    is_check[c - 1] = True
    window[c - 1] = c - previous
    previous = c
  return is_check, window


def _eot_value_and_grad(logits_fn, loss_fn, eot_iter: int):
  """``f(x, key) -> (loss, logits, grad)``: with ``eot_iter`` 1 one pass of ``logits_fn(x)``;
  else ``logits_fn(x, key_i)`` for ``eot_iter`` keys, the gradient averaged over the draws and
  the loss and logits of the last draw, as the reference's EOT (autopgd_base.py) does."""
  if eot_iter == 1:
    value_and_grad = core.loss_and_grad(logits_fn, lambda logits, _: loss_fn(logits))
    return lambda x, key: value_and_grad(x, None)

  def f(x, key):
    def draw(i):
      return core.loss_and_grad(lambda z: logits_fn(z, jax.random.fold_in(key, i)),
                                lambda logits, _: loss_fn(logits))(x, None)
    losses, logits, grads = jax.lax.map(draw, jnp.arange(eot_iter))
    return losses[-1], logits[-1], jnp.mean(grads, axis=0)
  return f


def _single_run(logits_fn: LogitsFn, x: jax.Array, loss_fn, fooled_fn, key: jax.Array,
                eps: core.Eps, norm: str, steps: int, rho: float, eot_iter: int = 1):
  """One APGD run of exactly `steps` iterations from a random start on the eps-sphere.

  loss_fn(logits) -> [B] is maximised; fooled_fn(logits) -> bool [B] says which points count as
  adversarial. Returns (x_out, out_loss, out_fooled, trace): per example the best point found
  (fooling first, then highest loss), its loss, whether it fools, and the best loss after each
  iteration, [steps + 1, B] (row 0: the start point).
  """
  value_and_grad = _eot_value_and_grad(logits_fn, loss_fn, eot_iter)
  expand = lambda mask: core.batch_broadcast(mask, x)
  init_key, eot_key = jax.random.split(key)
  x_adv = core.random_init(init_key if eot_iter > 1 else key, x, eps, norm, on_sphere=True)
  loss, logits, grad = value_and_grad(x_adv, jax.random.fold_in(eot_key, steps))
  batch = x.shape[0]
  start = dict(
      x_adv=x_adv, x_old=x_adv, grad=grad,
      # Best point by loss alone: the step-size rule restarts from it.
      x_best=x_adv, grad_best=grad, loss_best=loss,
      step=jnp.broadcast_to(2.0 * core.batch_broadcast(eps, x), (batch,) + (1,) * (x.ndim - 1)),
      loss_prev=loss, n_increase=jnp.zeros((batch,), jnp.float32),
      loss_best_last_check=loss, reduced_last_check=jnp.ones((batch,), jnp.bool_),
      # Best point to return: fooling beats not fooling, then higher loss.
      x_out=x_adv, out_loss=loss, out_fooled=fooled_fn(logits))

  def body(s, schedule):
    i, is_check, window = schedule
    momentum = jnp.where(i == 0, 1.0, 0.75)  # the reference takes a plain first step
    x_adv = s["x_adv"]
    z = core.project(x_adv + s["step"] * core.steepest_ascent_direction(s["grad"], norm),
                     x, eps, norm)
    x_new = core.project(x_adv + momentum * (z - x_adv) + (1.0 - momentum) * (x_adv - s["x_old"]),
                         x, eps, norm)
    loss, logits, grad = value_and_grad(x_new, jax.random.fold_in(eot_key, i))

    improved = loss > s["loss_best"]
    x_best = jnp.where(expand(improved), x_new, s["x_best"])
    grad_best = jnp.where(expand(improved), grad, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])
    fooled = fooled_fn(logits)
    better = core.is_better(loss, fooled, s["out_loss"], s["out_fooled"])
    n_increase = s["n_increase"] + (loss > s["loss_prev"])

    # Step-size rule, applied only at the last iteration of a window (is_check).
    few_increases = n_increase <= window * rho
    stalled = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
    halve = is_check & (few_increases | stalled)
    new = dict(
        x_adv=jnp.where(expand(halve), x_best, x_new),
        x_old=x_adv,
        grad=jnp.where(expand(halve), grad_best, grad),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        step=jnp.where(expand(halve), s["step"] / 2.0, s["step"]),
        loss_prev=loss,
        n_increase=jnp.where(is_check, 0.0, n_increase),
        loss_best_last_check=jnp.where(is_check, loss_best, s["loss_best_last_check"]),
        reduced_last_check=jnp.where(is_check, halve, s["reduced_last_check"]),
        x_out=jnp.where(expand(better), x_new, s["x_out"]),
        out_loss=jnp.where(better, loss, s["out_loss"]),
        out_fooled=s["out_fooled"] | fooled)
    return new, loss_best

  is_check, window = _schedule(steps)
  end, trace = jax.lax.scan(body, start, (jnp.arange(steps), is_check, window))
  trace = jnp.concatenate([loss[None], trace], axis=0)
  return end["x_out"], end["out_loss"], end["out_fooled"], trace


def _best_over_runs(logits_fn: LogitsFn, x: jax.Array, *, key: jax.Array, eps: core.Eps,
                    norm: str, steps: int, rho: float, num_runs: int,
                    objective: Callable[[jax.Array, jax.Array], tuple[Callable, Callable]],
                    return_trace: bool, eot_iter: int = 1):
  """Runs APGD `num_runs` times (a lax loop: one compiled body) and keeps the best per example.

  objective(run_index, clean_logits) -> (loss_fn, fooled_fn) for that run (targets change between
  runs). The clean image is the first candidate: an example the model already gets wrong (or that
  already reaches its target) returns x itself.
  """
  for name, value in (("steps", steps), ("runs", num_runs), ("eot_iter", eot_iter)):
    if value < 1:
      raise ValueError(f"APGD needs {name} >= 1, got {value}.")
  x = jax.lax.stop_gradient(x)
  # A stochastic model (eot_iter > 1) is asked for its clean logits with a fixed key.
  clean_logits = logits_fn(x) if eot_iter == 1 else logits_fn(x, jax.random.fold_in(key, 0x7FFFFFFF))
  _, fooled_fn = objective(jnp.asarray(0), clean_logits)
  clean_fooled = fooled_fn(clean_logits)
  batch = x.shape[0]
  start = (x, jnp.where(clean_fooled, jnp.inf, -jnp.inf), clean_fooled,
           jnp.full((steps + 1, batch), -jnp.inf, jnp.float32))

  def one_run(carry, run):
    x_out, out_loss, out_fooled, trace = carry
    loss_fn, fooled_fn = objective(run, clean_logits)
    run_x, run_loss, run_fooled, run_trace = _single_run(
        logits_fn, x, loss_fn, fooled_fn, jax.random.fold_in(key, run), eps, norm, steps, rho,
        eot_iter)
    better = core.is_better(run_loss, run_fooled, out_loss, out_fooled)
    return (jnp.where(core.batch_broadcast(better, x), run_x, x_out),
            jnp.where(better, run_loss, out_loss), out_fooled | run_fooled,
            jnp.maximum(trace, run_trace))

  def body(carry, run):
    # Like the reference, which attacks only points still robust: skip runs once all are fooled.
    skip = jnp.all(carry[2]) & (run > 0)
    return jax.lax.cond(skip, lambda c, _: c, one_run, carry, run), None

  (x_adv, _, _, trace), _ = jax.lax.scan(body, start, jnp.arange(num_runs))
  x_adv = jax.lax.stop_gradient(x_adv)
  return (x_adv, trace) if return_trace else x_adv


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: core.Eps,
         norm: str = "linf", loss: str | core.LossFn = "ce", steps: int = 100,
         n_restarts: int = 1, rho: float = 0.75, eot_iter: int = 1,
         return_trace: bool = False):
  """Untargeted APGD (APGD-CE with loss='ce', APGD-DLR with loss='dlr'), linf or l2.

  Returns adversarial images [B, H, W, C] within eps and in [0, 1]: per example a point that is
  misclassified if any run found one, else the highest-loss point. With return_trace=True returns
  (x_adv, trace), trace [steps + 1, B] the best loss after each iteration (max over restarts).
  Defaults are AutoAttack's: 100 iterations, 1 restart, rho 0.75.

  eot_iter > 1 (Expectation over Transformation, AutoAttack's 'rand' version: 20) is for
  randomised models: ``logits_fn(x, key)`` then takes a PRNG key, and each step's gradient is
  the mean over eot_iter draws. The loss and logits that decide success are the last draw's, as
  in the reference.
  """
  core.check_images(x)
  core.check_eps(eps, norm, x=x)
  # An EOT model takes a key too (eval_shape needs only its shape).
  core.check_labels(logits_fn, x, y, loss, *([jax.random.key(0)] if eot_iter > 1 else []))
  loss_fn = core.resolve_loss(loss)
  objective = lambda run, clean_logits: (lambda logits: loss_fn(logits, y),
                                         lambda logits: core.misclassified(logits, y))
  return _best_over_runs(logits_fn, x, key=key, eps=eps, norm=norm, steps=steps, rho=rho,
                         num_runs=n_restarts, objective=objective, return_trace=return_trace,
                         eot_iter=eot_iter)


def apgd_t(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: core.Eps,
           norm: str = "linf", steps: int = 100, n_restarts: int = 1, num_targets: int = 9,
           y_target: jax.Array | None = None, rho: float = 0.75, return_trace: bool = False,
           first_target: int | jax.Array = 0):
  """Targeted APGD on AutoAttack's targeted DLR loss (APGD-T), linf or l2. Needs >= 4 classes.

  Without y_target (AutoAttack): runs against each of the `num_targets` classes with the highest
  clean logits other than the top one (the 2nd, 3rd, ... largest), n_restarts runs each; success
  is any misclassification. With y_target [B]: attacks that class only and success means being
  classified as y_target. Returns x_adv like `apgd`; with return_trace=True also the best
  targeted-DLR loss after each iteration, [steps + 1, B], max over all runs. `first_target`
  (may be traced) starts at the (2 + first_target)-th largest logit instead: `core.run_per_target`
  runs one target a call, each on the points still robust, as the reference does.
  """
  core.check_images(x)
  core.check_eps(eps, norm, x=x)
  core.check_labels(logits_fn, x, y)
  if y_target is not None:
    core.check_labels(logits_fn, x, y_target)
  if y_target is None:
    num_classes = jax.eval_shape(logits_fn, x).shape[-1]
    last = num_targets + (first_target if isinstance(first_target, int) else 0)
    if not 1 <= num_targets <= last <= num_classes - 1:
      raise ValueError(f"num_targets (+ first_target) must be in [1, {num_classes - 1}] for a "
                       f"{num_classes}-class model, got {num_targets} (+ {first_target}).")

    def objective(run, clean_logits):
      ranked = jnp.argsort(clean_logits, axis=-1)  # ascending: the top class is last
      target = jnp.take(ranked, num_classes - 2 - first_target - run // n_restarts, axis=-1)
      return (lambda logits: core.targeted_dlr_loss(logits, y, target),
              lambda logits: core.misclassified(logits, y))
    num_runs = num_targets * n_restarts
  else:
    objective = lambda run, clean_logits: (
        lambda logits: core.targeted_dlr_loss(logits, y, y_target),
        lambda logits: jnp.argmax(logits, axis=-1) == y_target)
    num_runs = n_restarts
  return _best_over_runs(logits_fn, x, key=key, eps=eps, norm=norm, steps=steps, rho=rho,
                         num_runs=num_runs, objective=objective, return_trace=return_trace)

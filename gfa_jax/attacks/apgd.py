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
  * inside one call the runs (restarts, targets) are one compiled loop. By default
    (`compact=True`) each run attacks only the points no earlier run fooled, and a point stops
    stepping as soon as it fools the model: only the rows still in play reach the model
    (`core.on_active_rows`), so the reference's per-target loop over the points still robust
    becomes one compiled call. A fooled point stays fooled, so the robust mask is that of
    stepping every point every iteration (tested); the returned example of a fooled point is
    the first fooling iterate instead of the highest-loss one. Each row draws its start from
    its own key (`start_points`), so its search does not depend on its batch companions.
    An example never fooled returns its highest-loss point instead of the clean image.
    Remaining runs are skipped once the whole batch is fooled.
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
  """``f(x, labels, key) -> (loss, logits, grad)``: with ``eot_iter`` 1 one pass of
  ``logits_fn(x)``; else ``logits_fn(x, key_i)`` for ``eot_iter`` keys, the gradient averaged
  over the draws and the loss and logits of the last draw, as the reference's EOT
  (autopgd_base.py) does. ``labels`` is the pytree of per-row arrays ``loss_fn`` reads."""
  if eot_iter == 1:
    value_and_grad = core.loss_and_grad(logits_fn, loss_fn)
    return lambda x, labels, key: value_and_grad(x, labels)

  def f(x, labels, key):
    def draw(i):
      return core.loss_and_grad(lambda z: logits_fn(z, jax.random.fold_in(key, i)),
                                loss_fn)(x, labels)
    losses, logits, grads = jax.lax.map(draw, jnp.arange(eot_iter))
    return losses[-1], logits[-1], jnp.mean(grads, axis=0)
  return f


def start_points(key: jax.Array, x: jax.Array, eps: core.Eps, norm: str) -> jax.Array:
  """APGD's random start on the eps-sphere, row i drawn from its own key fold_in(key, i).

  Why per row: a row's start then does not depend on which rows share its batch, so stepping
  only the rows still in play (`compact`) cannot change any row's search.
  """
  eps_rows = jnp.broadcast_to(jnp.asarray(eps, x.dtype), x.shape[:1])
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
  return jax.vmap(lambda k, row, e: core.random_init(k, row[None], e, norm, on_sphere=True)[0])(
      keys, x, eps_rows)


def _single_run(logits_fn: LogitsFn, x: jax.Array, loss_fn, fooled_fn, labels, key: jax.Array,
                eps: core.Eps, norm: str, steps: int, rho: float, eot_iter: int = 1,
                live: jax.Array | None = None, compact: bool = False):
  """One APGD run of exactly `steps` iterations from a random start on the eps-sphere.

  loss_fn(logits, labels) -> [B] is maximised; fooled_fn(logits, labels) -> bool [B] says which
  points count as adversarial; `labels` is a pytree of [B] arrays (labels, targets). `live`
  (bool [B], default all) marks the rows to attack. With `compact`, a row stops once it fools
  the model and only the live rows are passed to the model (`core.on_active_rows`): a fooled
  point stays fooled, so which points fool is unchanged, only the work for the fooled ones is
  saved. Returns (x_out, out_loss, out_fooled, trace): per example the best point found
  (fooling first, then highest loss; -inf and not fooled for rows never live), its loss,
  whether it fools, and the best loss after each iteration, [steps + 1, B] (row 0: the start).
  """
  value_and_grad = _eot_value_and_grad(logits_fn, loss_fn, eot_iter)
  batch = x.shape[0]
  live = jnp.ones((batch,), jnp.bool_) if live is None else live
  eps_rows = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  init_key, eot_key = jax.random.split(key)
  x_adv = start_points(init_key if eot_iter > 1 else key, x, eps, norm)
  minus_inf = jnp.full((batch,), -jnp.inf, x.dtype)
  state = dict(
      x_adv=x_adv, x_old=x_adv, grad=jnp.zeros_like(x),
      # Best point by loss alone: the step-size rule restarts from it.
      x_best=x_adv, grad_best=jnp.zeros_like(x), loss_best=minus_inf,
      step=jnp.broadcast_to(2.0 * core.batch_broadcast(eps_rows, x), (batch,) + (1,) * (x.ndim - 1)),
      loss_prev=minus_inf, n_increase=jnp.zeros((batch,), jnp.float32),
      loss_best_last_check=minus_inf, reduced_last_check=jnp.ones((batch,), jnp.bool_),
      # Best point to return: fooling beats not fooling, then higher loss.
      x_out=x_adv, out_loss=minus_inf, out_fooled=jnp.zeros((batch,), jnp.bool_), live=live)
  consts = (x, eps_rows, labels)

  def keep_frozen(old, new):
    """Rows not live keep their state (they may pad a compacted slice)."""
    return jax.tree.map(lambda o, n: jnp.where(core.batch_broadcast(old["live"], o), n, o),
                        old, new)

  def begin(s, c):  # the gradient at the start point
    x, _, labels = c
    loss, logits, grad = value_and_grad(s["x_adv"], labels, jax.random.fold_in(eot_key, steps))
    fooled = fooled_fn(logits, labels)
    return keep_frozen(s, {**s, "grad": grad, "grad_best": grad, "loss_best": loss,
                           "loss_prev": loss, "loss_best_last_check": loss, "out_loss": loss,
                           "out_fooled": fooled, "live": s["live"] & ~(compact & fooled)})

  def advance(s, c, i, is_check, window):
    x, eps, labels = c
    expand = lambda mask: core.batch_broadcast(mask, x)
    momentum = jnp.where(i == 0, 1.0, 0.75)  # the reference takes a plain first step
    x_adv = s["x_adv"]
    z = core.project(x_adv + s["step"] * core.steepest_ascent_direction(s["grad"], norm),
                     x, eps, norm)
    x_new = core.project(x_adv + momentum * (z - x_adv) + (1.0 - momentum) * (x_adv - s["x_old"]),
                         x, eps, norm)
    loss, logits, grad = value_and_grad(x_new, labels, jax.random.fold_in(eot_key, i))

    improved = loss > s["loss_best"]
    x_best = jnp.where(expand(improved), x_new, s["x_best"])
    grad_best = jnp.where(expand(improved), grad, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])
    fooled = fooled_fn(logits, labels)
    better = core.is_better(loss, fooled, s["out_loss"], s["out_fooled"])
    n_increase = s["n_increase"] + (loss > s["loss_prev"])

    # Step-size rule, applied only at the last iteration of a window (is_check).
    few_increases = n_increase <= window * rho
    stalled = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
    halve = is_check & (few_increases | stalled)
    return keep_frozen(s, dict(
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
        out_fooled=s["out_fooled"] | fooled,
        live=s["live"] & ~(compact & fooled)))

  def body(s, schedule):
    update = lambda rows, c: advance(rows, c, *schedule)
    if compact:
      s = core.on_active_rows(update, s["live"], s, consts,
                                 chunk=core.compact_chunk(batch))
    else:
      s = update(s, consts)
    return s, s["loss_best"]

  # The start gradient for every row: 1 of steps + 1 gradients, not worth more compiled copies.
  state = begin(state, consts)
  is_check, window = _schedule(steps)
  end, trace = jax.lax.scan(body, state, (jnp.arange(steps), is_check, window))
  trace = jnp.concatenate([state["loss_best"][None], trace], axis=0)
  return end["x_out"], end["out_loss"], end["out_fooled"], trace


def _best_over_runs(logits_fn: LogitsFn, x: jax.Array, *, key: jax.Array, eps: core.Eps,
                    norm: str, steps: int, rho: float, num_runs: int,
                    objective: Callable[[jax.Array, jax.Array], tuple[Callable, Callable, object]],
                    return_trace: bool, eot_iter: int = 1, compact: bool = True):
  """Runs APGD `num_runs` times (a lax loop: one compiled body) and keeps the best per example.

  objective(run_index, clean_logits) -> (loss_fn, fooled_fn, labels) for that run (targets
  change between runs). The clean image is the first candidate: an example the model already
  gets wrong (or that already reaches its target) returns x itself. With `compact` (not for a
  trace, nor for EOT, whose model draws its randomness per batch) each run attacks only the
  points no earlier run fooled and drops each point as soon as it fools, as the reference's
  `perturb` attacks only the points still robust: the same points end up fooled, for the
  work the still-robust points need.
  """
  for name, value in (("steps", steps), ("runs", num_runs), ("eot_iter", eot_iter)):
    if value < 1:
      raise ValueError(f"APGD needs {name} >= 1, got {value}.")
  compact = compact and not return_trace and eot_iter == 1
  x = jax.lax.stop_gradient(x)
  # A stochastic model (eot_iter > 1) is asked for its clean logits with a fixed key.
  clean_logits = logits_fn(x) if eot_iter == 1 else logits_fn(x, jax.random.fold_in(key, 0x7FFFFFFF))
  _, fooled_fn, labels = objective(jnp.asarray(0), clean_logits)
  clean_fooled = fooled_fn(clean_logits, labels)
  batch = x.shape[0]
  start = (x, jnp.where(clean_fooled, jnp.inf, -jnp.inf), clean_fooled,
           jnp.full((steps + 1, batch), -jnp.inf, jnp.float32))

  def one_run(carry, run):
    x_out, out_loss, out_fooled, trace = carry
    loss_fn, fooled_fn, labels = objective(run, clean_logits)
    run_x, run_loss, run_fooled, run_trace = _single_run(
        logits_fn, x, loss_fn, fooled_fn, labels, jax.random.fold_in(key, run), eps, norm, steps,
        rho, eot_iter, live=~out_fooled if compact else None, compact=compact)
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
         return_trace: bool = False, compact: bool = True):
  """Untargeted APGD (APGD-CE with loss='ce', APGD-DLR with loss='dlr'), linf or l2.

  Returns adversarial images [B, H, W, C] within eps and in [0, 1]: per example a point that is
  misclassified if any run found one, else the highest-loss point. With return_trace=True returns
  (x_adv, trace), trace [steps + 1, B] the best loss after each iteration (max over restarts).
  Defaults are AutoAttack's: 100 iterations, 1 restart, rho 0.75.

  eot_iter > 1 (Expectation over Transformation, AutoAttack's 'rand' version: 20) is for
  randomised models: ``logits_fn(x, key)`` then takes a PRNG key, and each step's gradient is
  the mean over eot_iter draws. The loss and logits that decide success are the last draw's, as
  in the reference. `compact` (default) stops each point once it fools (module docstring);
  EOT and `return_trace` always step every point.
  """
  core.check_images(x)
  core.check_eps(eps, norm, x=x)
  # An EOT model takes a key too (eval_shape needs only its shape).
  core.check_labels(logits_fn, x, y, loss, *([jax.random.key(0)] if eot_iter > 1 else []))
  loss_fn = core.resolve_loss(loss)
  objective = lambda run, clean_logits: (loss_fn, core.misclassified, y)
  return _best_over_runs(logits_fn, x, key=key, eps=eps, norm=norm, steps=steps, rho=rho,
                         num_runs=n_restarts, objective=objective, return_trace=return_trace,
                         eot_iter=eot_iter, compact=compact)


def apgd_t(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: core.Eps,
           norm: str = "linf", steps: int = 100, n_restarts: int = 1, num_targets: int = 9,
           y_target: jax.Array | None = None, rho: float = 0.75, return_trace: bool = False,
           first_target: int | jax.Array = 0, compact: bool = True):
  """Targeted APGD on AutoAttack's targeted DLR loss (APGD-T), linf or l2. Needs >= 4 classes.

  Without y_target (AutoAttack): runs against each of the `num_targets` classes with the highest
  clean logits other than the top one (the 2nd, 3rd, ... largest), n_restarts runs each; success
  is any misclassification. With y_target [B]: attacks that class only and success means being
  classified as y_target. Returns x_adv like `apgd`; with return_trace=True also the best
  targeted-DLR loss after each iteration, [steps + 1, B], max over all runs. `first_target`
  (may be traced) starts at the (2 + first_target)-th largest logit instead. With `compact` (default) each target attacks only the points no
  earlier target fooled, as the reference's loop over targets does, in one compiled call.
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
      return _targeted_dlr, lambda logits, labels: core.misclassified(logits, labels[0]), (
          y, target)
    num_runs = num_targets * n_restarts
  else:
    objective = lambda run, clean_logits: (
        _targeted_dlr, lambda logits, labels: jnp.argmax(logits, axis=-1) == labels[1],
        (y, y_target))
    num_runs = n_restarts
  return _best_over_runs(logits_fn, x, key=key, eps=eps, norm=norm, steps=steps, rho=rho,
                         num_runs=num_runs, objective=objective, return_trace=return_trace,
                         compact=compact)


def _targeted_dlr(logits: jax.Array, labels: tuple[jax.Array, jax.Array]) -> jax.Array:
  y, target = labels
  return core.targeted_dlr_loss(logits, y, target)

"""Gradient-Feature Alignment (GFA), the DeepDefense regulariser, as a composable function.

For a tapped layer input ``h`` (per sample, flattened) and the batch task loss ``L``::

    cos = <dL/dh, h> / (||dL/dh|| * ||h||)        per sample
    alignment = mean over the batch of cos         per layer
    penalty = mean over layers of w * (1 - alignment)     (w = 1 unless per-layer weights)

Three readings of the paper are options (``gfa_penalty`` / ``gfa_objective`` keywords, and
``config.gfa_gradient`` / ``gfa_direction`` / ``gfa_reduction`` in training):

- ``gradient='exact'`` (default) differentiates through ``dL/dh`` (double backprop);
  ``'detached'`` stops its gradient, as PyTorch's ``autograd.grad(loss, h, retain_graph=True)``
  without ``create_graph=True`` does, so the penalty trains the parameters only through ``h``.
- ``direction='align'`` (default) adds ``1 - cos``; ``'anti'`` is the paper's formula read
  literally, ``alpha * MSE - beta * (1 - cos)``: the penalty is ``-(1 - cos)``, which pushes the
  cosine towards -1.
- ``reduction='mean'`` (default) averages the layers' terms; ``'sum'`` adds them (the paper's
  critical-path description sums).

``dL/dh`` comes from one ``jax.vjp`` of the user's loss function with respect to zero-valued
"taps" added to the layer inputs (Flax ``perturb``); differentiating the penalty then runs a
second backward pass (double backprop), all inside whatever ``jit`` the caller uses.

Models with state. ``gfa_objective`` takes a Linen model's other collections (``state``), the
ones its forward pass updates (``mutable``, returned in ``aux['state']``), ``rngs`` and
``apply_kwargs``; an NNX module holds all of these itself (``gfa_jax.nnx_taps``). A BatchNorm in
training mode normalises sample i with its batch's mean and variance. Here ``dL/dh_i`` is the
exact gradient of the batch loss with those statistics in the graph (the cross-sample terms
included), what PyTorch's autograd gives the paper's code in ``model.train()``; ``h_i`` is
sample i's own layer input; the statistics are updated once per step, from that one forward
pass. Not chosen: running averages inside the penalty (a batch-independent cosine), which costs
a second forward pass and differentiates a function training does not minimise; eval mode
(``train=False``, ``model.eval()``) computes exactly that cosine when wanted.

The module also holds the convenience layer: ``tap`` (what a model calls on each layer input),
``tap_module_inputs`` (tap any existing Flax model without editing it), ``zero_taps`` and
``gfa_objective`` (``alpha * task_loss + beta * penalty`` in one call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gfa_jax import nnx_taps, numerics
from gfa_jax.numerics import safe_norm

PyTree = Any
FEATURES = "intermediates"  # Flax collection that holds the tapped layer inputs (sow).
TAPS = "perturbations"  # Flax collection of zero arrays added to them (perturb).


def per_sample_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Cosine similarity of ``a[i]`` and ``b[i]`` over all non-batch axes; returns shape [B].

  A zero vector has cosine 0 with anything (the denominator is clamped at ``eps``), with
  finite gradients.
  """
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  dot = jnp.sum(a * b, axis=-1)
  return dot / jnp.maximum(safe_norm(a) * safe_norm(b), eps)


GRADIENTS = ("exact", "detached")
DIRECTIONS = ("align", "anti")
REDUCTIONS = ("mean", "sum")


def gfa_penalty(
    loss_fn: Callable[[PyTree], tuple[jax.Array, PyTree]],
    taps: PyTree,
    *,
    eps: float = 1e-12,
    has_aux: bool = False,
    layer_weights: Mapping[str, float] | None = None,
    gradient: str = "exact",
    direction: str = "align",
    reduction: str = "mean",
) -> tuple[jax.Array, dict[str, Any]]:
  """The GFA penalty ``mean_l w_l (1 - alignment_l)`` and its ingredients.

  Args:
    loss_fn: ``taps -> (task_loss, features)``: the scalar task loss of the batch computed
      with ``taps`` added to the layer inputs, and the layer inputs themselves (same tree
      structure as ``taps``). Everything it closes over (parameters, images) receives the
      penalty's gradient.
    taps: pytree of zero arrays with a leading batch axis, one per tapped layer input.
    eps: lower bound of the cosine's denominator.
    has_aux: if True, ``loss_fn`` returns ``(task_loss, (features, extra))`` and ``extra``
      (e.g. the logits, for accuracy) is passed back as ``aux['extra']``.
    layer_weights: ``{tap name: w}`` for a dict of taps, a per-layer beta relative to the
      caller's: each layer's ``1 - alignment`` is multiplied by its weight (1 if not named)
      before the mean over layers, so all-ones weights give the plain penalty.
    gradient: ``'exact'`` or ``'detached'`` (``dL/dh`` treated as a constant; module docstring).
    direction: ``'align'`` (penalty ``1 - cos``) or ``'anti'`` (``-(1 - cos)``, the literal
      formula).
    reduction: ``'mean'`` or ``'sum'`` over the tapped layers.

  Returns:
    ``(penalty, aux)``: the scalar penalty (signed: negative for ``direction='anti'``), and ``aux = {'task_loss': scalar,
    'alignment': tree like taps of per-layer batch-mean cosines, 'cosines': the same with the
    per-sample cosines [B]}``. The task loss comes from the same forward pass, so callers need
    not run the model twice.
  """
  for name, value, allowed in (("gradient", gradient, GRADIENTS),
                               ("direction", direction, DIRECTIONS),
                               ("reduction", reduction, REDUCTIONS)):
    if value not in allowed:
      raise ValueError(f"gfa_penalty {name}={value!r} is not one of {allowed}.")
  try:
    eps_ok = np.ndim(eps) == 0 and float(eps) > 0
  except (TypeError, ValueError):
    eps_ok = False
  if not eps_ok:
    # eps = 0 turns the cosine of a zero vector into 0/0 = NaN.
    raise ValueError(f"gfa_penalty eps must be > 0, one number (the cosine's denominator "
                     f"floor), got {eps!r:.60}.")
  task_loss, vjp_fn, features = jax.vjp(loss_fn, taps, has_aux=True)
  extra = None
  if has_aux:
    features, extra = features
  (grads,) = vjp_fn(jnp.ones_like(task_loss))
  if jax.tree.structure(features) != jax.tree.structure(taps):
    raise ValueError(
        "loss_fn must return features with the same tree structure as taps; got "
        f"{jax.tree.structure(features)} for taps {jax.tree.structure(taps)}. Sow every "
        "tapped layer input (gfa_jax.tap does both) and select the same names."
    )
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(features)):
    if g.shape != h.shape:
      raise ValueError(f"tap {jax.tree_util.keystr(path)} has shape {g.shape} but the layer "
                       f"input it taps has shape {h.shape}; make the taps with zero_taps.")
  if gradient == "detached":
    grads = jax.lax.stop_gradient(grads)
  cosines = jax.tree.map(lambda g, h: per_sample_cosine(g, h, eps), grads, features)
  alignment = jax.tree.map(jnp.mean, cosines)
  weights = layer_weight_tree(alignment, layer_weights)
  terms = jax.tree.leaves(jax.tree.map(lambda w, a: w * (1.0 - a), weights, alignment))
  penalty = sum(terms) if reduction == "sum" else sum(terms) / len(terms)
  if direction == "anti":
    penalty = -penalty
  aux = {"task_loss": task_loss, "alignment": alignment, "cosines": cosines}
  if has_aux:
    aux["extra"] = extra
  return penalty, aux


def layer_weight_tree(alignment: PyTree, layer_weights: Mapping[str, float] | None) -> PyTree:
  """A tree like ``alignment`` holding each leaf's weight: ``layer_weights[name]`` for the
  leaves under the top-level entry ``name``, 1 elsewhere."""
  if not layer_weights:
    return jax.tree.map(lambda _: 1.0, alignment)
  if not isinstance(alignment, Mapping) or set(layer_weights) - set(alignment):
    names = sorted(alignment) if isinstance(alignment, Mapping) else "(taps are not a dict)"
    raise ValueError(f"layer_weights names {sorted(layer_weights)}, but the taps are {names}; "
                     "weight only tapped layers, by the names the taps use.")
  return {name: jax.tree.map(lambda _, w=layer_weights.get(name, 1.0): w, subtree)
          for name, subtree in alignment.items()}


# --------------------------------------------------------------------------------------------
# Convenience layer: tapping, zero taps, the one-call objective.


def tap(module: nn.Module | nnx.Module, name: str, h: jax.Array) -> jax.Array:
  """Exposes the layer input ``h`` under ``name``: sows it and adds its (zero) tap.

  Models call this on every layer input (``h = tap(self, 'layer1', h)``); nothing else about
  GFA is model specific. The tap is added only where the caller passed one for ``name``, so
  FIRST and DEEP select taps by name without touching the model. Linen and NNX modules alike
  (NNX: ``nnx_taps.tap``, an ``nnx.Intermediate`` and an ``nnx.Perturbation``).
  """
  if isinstance(module, nnx.Module):
    return nnx_taps.tap(module, name, h)
  module.sow(FEATURES, name, h, init_fn=lambda: None, reduce_fn=lambda _, new: new)
  if module.is_initializing() or module.has_variable(TAPS, name):
    h = module.perturb(name, h, collection=TAPS)
  return h


@contextlib.contextmanager
def tap_module_inputs(module_names: Sequence[str]) -> Iterator[None]:
  """Taps the first argument of ``__call__`` of the named submodules of ANY Flax model.

  Inside this context, a submodule whose name (e.g. ``'Conv_0'``) or path (``'block/Dense_1'``)
  is listed has its input sown and perturbed under its own scope: the features and taps then
  live at ``{'Conv_0': {'input': ...}}`` in the collections, which ``zero_taps`` and
  ``features_of`` handle like any other tree. Use it for models you cannot edit.
  """
  wanted = set(module_names)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = "/".join(module.scope.path) if module.scope is not None else ""
    if context.method_name == "__call__" and args and (module.name in wanted or path in wanted):
      args = (tap(module, "input", args[0]),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def select(tree: dict, names: Sequence[str] | None) -> dict:
  """Keeps the top-level entries ``names`` of a collection (all when ``names`` is None)."""
  if names is None:
    return dict(tree)
  missing = [n for n in names if n not in tree]
  if missing:
    raise ValueError(f"unknown tap names {missing}; this model exposes {sorted(tree)}")
  return {n: tree[n] for n in names}


def zero_taps(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args,
    names: Sequence[str] | None = None,
    state: Mapping[str, PyTree] | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """Zero taps for a model and batch: ``{name: zeros_like(layer input)}``.

  Shapes come from ``jax.eval_shape`` of one apply with every collection mutable (a BatchNorm
  in training mode writes its statistics), so no FLOPs are spent. ``apply_fn`` is a Flax
  ``Module.apply``, called as ``apply_fn({**state, **variables}, *args, rngs=rngs,
  **apply_kwargs)``: the same call ``gfa_objective`` makes.
  """
  variables = {**(state or {}), **variables}
  kwargs = apply_kwargs_with_rngs(apply_kwargs, rngs)
  _, out = jax.eval_shape(lambda v, *a: apply_fn(v, *a, mutable=True, **kwargs), variables, *args)
  shapes = select(out.get(FEATURES, {}), names)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def apply_kwargs_with_rngs(apply_kwargs: Mapping[str, Any] | None,
                           rngs: Mapping[str, jax.Array] | None) -> dict:
  """The keyword arguments of one Linen ``apply``: the model's own plus ``rngs`` if given."""
  return {**(apply_kwargs or {}), **({} if rngs is None else {"rngs": rngs})}


def collection_names(mutable: str | Sequence[str]) -> tuple[str, ...]:
  """``mutable`` as a tuple of collection names (one name alone, as Flax's ``apply`` takes it)."""
  if isinstance(mutable, str):
    return (mutable,)
  if isinstance(mutable, bool) or not all(isinstance(c, str) for c in mutable):
    raise ValueError(f"gfa_objective mutable must name the collections the forward pass "
                     f"updates, e.g. ('batch_stats',); got {mutable!r}")
  return tuple(mutable)


def linen_parts(apply_fn, params, x, y, task_loss, layers, state, mutable, rngs, apply_kwargs):
  """``(loss_fn, taps)`` of ``gfa_objective`` for a Linen ``apply``: ``loss_fn(taps)`` returns
  ``(task_loss, (features, (logits, updated collections)))``, ``gfa_penalty``'s has_aux form.

  ``state`` (the non-'params' collections) is read, never differentiated by this function;
  the collections in ``mutable`` come back as the forward pass updated them. The batch's one
  forward pass is the one ``gfa_penalty`` differentiates, so a BatchNorm in training mode
  normalises with this batch's statistics in both the loss and ``dL/dh``.
  """
  # The taps and features collections are this function's: ones left in ``state`` by
  # ``model.init`` (which runs the taps) are dropped.
  state = {k: v for k, v in (state or {}).items() if k not in (TAPS, FEATURES)}
  variables = {**state, "params": params}
  kwargs = apply_kwargs_with_rngs(apply_kwargs, rngs)
  taps = zero_taps(apply_fn, variables, x, names=layers, rngs=rngs, apply_kwargs=apply_kwargs)

  def loss_fn(taps):
    logits, updated = apply_fn({**variables, TAPS: taps}, x, mutable=[FEATURES, *mutable],
                               **kwargs)
    updates = {c: updated[c] for c in mutable if c in updated}
    return task_loss(logits, y), (select(updated.get(FEATURES, {}), layers), (logits, updates))

  return loss_fn, taps


def gfa_objective(
    apply_fn: Callable[..., Any],
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    task_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    layers: Sequence[str],
    alpha: float = 1.0,
    beta: float | jax.Array = 1.0,
    state: Mapping[str, PyTree] | None = None,
    mutable: str | Sequence[str] = (),
    rngs: Mapping[str, jax.Array] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    **penalty_options: Any,
) -> tuple[jax.Array, dict[str, Any]]:
  """``alpha * task_loss + beta * penalty`` for a Flax model, in one call.

  Args:
    apply_fn: the model's ``apply`` (``model.apply``), whose layer inputs are tapped with
      ``tap`` (or inside ``tap_module_inputs``); or an ``nnx.Module`` (see ``nnx_taps``:
      ``layers`` then name submodules by attribute path, ``'blocks/0/conv'``, or the model's
      own taps, and state updates are written into the module).
    params: the ``'params'`` collection (None for an NNX module).
    x, y: a batch and its labels.
    task_loss: ``(logits, y) -> scalar`` batch loss.
    layers: names of the tapped layer inputs (e.g. ``('layer0',)`` for FIRST).
    state: the model's other collections (e.g. ``{'batch_stats': ...}``), read as they are.
    mutable: the collections the forward pass updates (e.g. ``('batch_stats',)`` for a
      BatchNorm in training mode), returned in ``aux['state']``.
    rngs: ``apply``'s rngs (e.g. ``{'dropout': key}``); the same key serves the taps' shape
      pass and the forward pass.
    apply_kwargs: the model's own keyword arguments (e.g. ``{'train': True}``; for NNX, the
      module call's).
    penalty_options: ``gfa_penalty``'s keyword arguments, passed on as they are (one
      signature to keep right): ``eps``, ``layer_weights`` (per-layer beta multipliers) and
      the paper's readings ``gradient``, ``direction`` and ``reduction``.

  Returns:
    ``(objective, aux)`` with ``aux`` from ``gfa_penalty`` plus ``'penalty'``, ``'logits'`` and
    ``'state'`` (``{collection: updated value}`` for ``mutable``; ``{}`` when none, and for
    NNX, whose updates land in the module).
  """
  if layers is not None and (isinstance(layers, str) or not len(layers)):  # None: every tap
    raise ValueError(f"gfa_objective needs layers=(name, ...) of at least one tapped layer "
                     f"input (or None for all), got {layers!r}; the mean over no layers is 0/0")
  if jnp.ndim(x) == 4:  # Images: the attacks' check (range only when x is concrete).
    numerics.check_images(x)
  class_indices = jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer) or jnp.ndim(y) == 1
  if class_indices:  # Not one-hot or soft targets: integers, one per image (when concrete).
    numerics.check_labels(y, None, len(x))
  if isinstance(apply_fn, nnx.Module):
    linen_only = {"params": params, "state": state, "mutable": mutable or None,
                  "rngs": rngs}
    given = [name for name, value in linen_only.items() if value is not None]
    if given:
      raise ValueError(f"gfa_objective got {given} with an NNX module, which holds its own "
                       "parameters, state and rngs; call gfa_objective(model, None, x, y, ...)")
    loss_fn, taps, finish = nnx_taps.objective_parts(apply_fn, x, y, task_loss, layers,
                                                     apply_kwargs)
  else:
    loss_fn, taps = linen_parts(apply_fn, params, x, y, task_loss, layers, state,
                                collection_names(mutable), rngs, apply_kwargs)
    finish = dict
  penalty, aux = gfa_penalty(loss_fn, taps, has_aux=True, **penalty_options)
  objective = alpha * aux["task_loss"] + beta * penalty
  logits, updates = aux.pop("extra")
  if class_indices:  # Below the number of logits (known now).
    numerics.check_labels(y, logits.shape[-1], len(logits))
  return objective, {**aux, "penalty": penalty, "logits": logits, "state": finish(updates)}

"""GFA on Flax NNX modules: the taps and the loss function ``gfa_penalty`` differentiates.

``gfa_penalty(loss_fn, taps)`` knows nothing about Flax; this module builds both for an
``nnx.Module`` with Flax's own intermediates API (``nnx.capture``, ``nnx.Intermediate``,
``nnx.Perturbation``): a tapped layer input is sown as an ``Intermediate`` (the features ``h``)
and gets a zero ``Perturbation`` added (the tap whose gradient is ``dL/dh``).

Layers are named by attribute path with ``/`` (``'c1'``, ``'blocks/0/conv'``, the form
``tap_module_inputs`` uses for Linen): such a name taps the INPUT (first argument) of that
submodule's ``__call__`` without editing the model. A model may also tap explicitly with
``gfa_jax.tap(self, 'layer0', h)``; that tap is named by its module's path and its name
(``'layer0'`` at the top, ``'block/layer1'`` inside ``self.block``). Each tapped module or tap
is called once per forward pass.

The forward pass runs on a copy of the module (``nnx.split`` / ``nnx.merge`` inside the
function ``gfa_penalty`` differentiates, so no Variable is written across JAX trace levels);
afterwards its non-parameter state (BatchNorm statistics, dropout RNG counts) is written back
into the caller's module, as a plain ``model(x)`` would. The parameters' gradient flows through
the copy, so ``nnx.grad`` / ``nnx.value_and_grad`` of ``gfa_objective(model, None, ...)``
gives the gradient with respect to the module's ``nnx.Param``, under ``nnx.jit`` too.
``model.train()`` / ``model.eval()`` modes are the module's own attributes and are respected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

INPUT = "input"  # The name of a tapped submodule input, under that submodule's path.


def tap(module: nnx.Module, name: str, h: jax.Array) -> jax.Array:
  """NNX ``gfa_jax.tap``: sows ``h`` as an ``nnx.Intermediate`` and adds its ``nnx.Perturbation``.

  Returns ``h`` (plus the zero tap inside ``nnx.capture``). Outside ``nnx.capture`` it is the
  identity and writes nothing into the module (``sow`` would store ``h`` as an attribute).
  """
  if not hasattr(module, "__captures__"):
    return h
  module.sow(nnx.Intermediate, name, h, init_fn=lambda: None, reduce_fn=lambda _, new: new)
  return module.perturb(name, h)


def submodules(module: nnx.Module) -> dict[str, nnx.Module]:
  """``{'a/b/0': submodule}``: every submodule under its ``/``-joined attribute path."""
  return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(module) if path}


def _call_owner(cls: type) -> type:
  """The class in ``cls``'s MRO that defines the ``__call__`` a call of an instance runs."""
  return next(c for c in cls.__mro__ if "__call__" in c.__dict__)


@contextlib.contextmanager
def tapping_inputs(modules: Sequence[nnx.Module]) -> Iterator[None]:
  """Taps the first argument of ``__call__`` of exactly these module instances.

  Python looks ``__call__`` up on the class, so the class that defines it is patched for the
  duration (as ``nnx.capture(method_outputs=...)`` does) with a wrapper that taps only the
  listed instances, once per call even where a subclass's ``__call__`` calls its base's.
  """
  wanted = {id(m) for m in modules}
  active: set[int] = set()
  owners = {_call_owner(type(m)) for m in modules}
  originals = {cls: cls.__dict__["__call__"] for cls in owners}

  def patched(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self, *args, **kwargs):
      if id(self) not in wanted or id(self) in active or not args:
        return original(self, *args, **kwargs)
      active.add(id(self))
      try:
        return original(self, tap(self, INPUT, args[0]), *args[1:], **kwargs)
      finally:
        active.discard(id(self))
    return call

  for cls, original in originals.items():
    cls.__call__ = patched(original)
  try:
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def _flat(captured: nnx.State, inputs: set[str]) -> dict[str, tuple[tuple, Any]]:
  """``{layer name: (state path, value)}`` from a captured state: ``'a/b/name'`` for a tap
  named ``name`` in module ``a/b``, and ``'a/b'`` for the tapped input of submodule ``a/b``."""
  flat = {}
  for path, var in nnx.to_flat_state(captured):
    key = "/".join(map(str, path))
    prefix = "/".join(map(str, path[:-1]))
    flat[prefix if path[-1] == INPUT and prefix in inputs else key] = (path, var.get_value())
  return flat


def _nested(flat: Mapping[str, jax.Array], paths: Mapping[str, tuple]) -> dict:
  """The ``init`` state of ``nnx.capture``: each tap as an ``nnx.Perturbation`` at its path."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = paths[name]
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = nnx.Perturbation(value)
  return tree


def objective_parts(
    module: nnx.Module,
    x: jax.Array,
    y: jax.Array,
    task_loss: Callable[[jax.Array, jax.Array], jax.Array],
    layers: Sequence[str] | None,
    apply_kwargs: Mapping[str, Any] | None,
) -> tuple[Callable, dict, Callable[[Any], dict]]:
  """``(loss_fn, taps, finish)`` of ``gfa_objective`` for an NNX module.

  ``loss_fn(taps)`` returns ``(task_loss, (features, (logits, new state)))``, the has_aux form
  of ``gfa_penalty``; ``taps`` is ``{layer name: zeros}``; ``finish(new state)`` writes the
  forward pass's non-parameter state into ``module`` and returns ``{}`` (``aux['state']``: for
  NNX the updates live in the module, where NNX users look for them).
  """
  graphdef, state = nnx.split(module)
  subs = submodules(module)
  inputs = set() if layers is None else {name for name in layers if name in subs}
  kwargs = dict(apply_kwargs or {})

  def forward(state, kind, init):
    # New Variables (copy=True), owned by the trace this runs in: the BatchNorm writes its
    # statistics inside gfa_penalty's vjp, where the caller's Variables are read-only.
    copy = nnx.merge(graphdef, state, copy=True)
    copy_subs = submodules(copy)
    with tapping_inputs([copy_subs[name] for name in sorted(inputs)]):
      logits, captured = nnx.capture(copy, kind, init=init)(x, **kwargs)
    return logits, captured, nnx.state(copy, nnx.Not(nnx.Param))

  # One kind per capture: a tap's Intermediate and Perturbation share a name, and a captured
  # state holds one Variable per name. Shapes only (no FLOPs): the first ``perturb`` of each
  # tap creates it as zeros.
  _, perturbations, _ = jax.eval_shape(lambda s: forward(s, nnx.Perturbation, None), state)
  flat_taps = _flat(perturbations, inputs)
  available = sorted(flat_taps)
  names = available if layers is None else list(layers)
  missing = [n for n in names if n not in available]
  if missing:
    raise ValueError(f"unknown NNX layers {missing}: name a submodule by its attribute path "
                     f"({sorted(subs)}) or a tap the model makes ({available}).")
  paths = {n: flat_taps[n][0] for n in names}
  taps = {n: jnp.zeros(flat_taps[n][1].shape, flat_taps[n][1].dtype) for n in names}

  def loss_fn(taps):
    logits, captured, new_state = forward(state, nnx.Intermediate, _nested(taps, paths))
    features = _flat(captured, inputs)
    unsown = [n for n in names if n not in features]
    if unsown:
      raise ValueError(f"NNX taps {unsown} are perturbed but not sown; tap layer inputs with "
                       "gfa_jax.tap(self, name, h), which does both.")
    return task_loss(logits, y), ({n: features[n][1] for n in names}, (logits, new_state))

  def finish(new_state) -> dict:
    nnx.update(module, new_state)
    return {}

  return loss_fn, taps, finish

"""Models from anywhere: one small layer turns what a user has into the `Model` evaluators take.

`as_model(obj, variables=None, *, label=None, apply_kwargs=None)` accepts

- a plain ``logits_fn(x)``: any JAX function of images [N, H, W, C] in [0, 1] -> logits [N, K]
  (a `batching.bind`-made ``jax.tree_util.Partial`` keeps its weights traced);
- a Flax NNX module: split once into (graphdef, state) in **eval mode** (`nnx.view` with
  ``deterministic=True, use_running_average=True``: Dropout off, BatchNorm on its running
  averages), the user's module left untouched; the state is the traced variables and the module
  is merged again inside every call;
- a Linen ``(apply_fn, variables)`` pair (or ``as_model(apply_fn, variables)``), or a Linen
  ``nn.Module`` with its variables (``{"params": ..., "batch_stats": ...}``); inference mode is
  the user's to choose through `apply_kwargs`, e.g. ``{"train": False}``;
- a `Model`, returned as it is.

Weights always stay traced arguments of the compiled attacks (`batching.bind`), and the
function part of a Model compares equal for two models of one architecture (two NNX modules
with equal graphdefs, two equal Linen modules), so evaluating a second model of the same
architecture compiles nothing new (tests/test_adapters.py). gfa-jax itself never imports torch:
a PyTorch state_dict enters through `gfa_jax.load_torch_model`, whose (apply_fn, variables) pair
this module accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from gfa_jax import batching


@dataclasses.dataclass(frozen=True)
class Model:
  """A model to evaluate: ``apply_fn(variables, images in [0, 1]) -> logits``, its name in
  reports and plots, and the config it was trained with (task loss, data set)."""
  apply_fn: Callable
  variables: Any
  label: str
  config: Any = None

  @property
  def logits_fn(self) -> jax.tree_util.Partial:
    """``images -> logits`` with the weights as traced arguments (`batching.bind`): what the
    attacks and `evaluate.evaluate` take."""
    return batching.bind(self.apply_fn, self.variables)


@dataclasses.dataclass(frozen=True)
class _LinenApply:
  """``module.apply(variables, x, **kwargs)`` compared by module value: a bound ``apply`` of
  each instance compares by identity and would compile every attack again per instance."""
  module: nn.Module
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __call__(self, variables, x, **kwargs):
    # Extra keywords (mutable=..., used by the analyses' taps) pass through to Linen.
    return self.module.apply(variables, x, **dict(self.kwargs), **kwargs)


@dataclasses.dataclass(frozen=True)
class _WithKwargs:
  """``apply_fn(variables, x, **kwargs)`` for an arbitrary apply_fn, hashable by value."""
  apply_fn: Callable
  kwargs: tuple[tuple[str, Any], ...]

  def __call__(self, variables, x, **kwargs):
    return self.apply_fn(variables, x, **dict(self.kwargs), **kwargs)


@dataclasses.dataclass(frozen=True)
class _NNXApply:
  """The module of `graphdef` merged with the traced `state`, called on x. Equal graphdefs (one
  architecture, one mode) give equal functions, so no compiled attack is built twice."""
  graphdef: Any
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __call__(self, state, x):
    return nnx.merge(self.graphdef, state)(x, **dict(self.kwargs))


def _call(logits_fn: Callable, x):
  """The Model form of a plain function: its `batching.as_pytree` Partial is the variables."""
  return logits_fn(x)


def _name(fn: Any, default: str = "model") -> str:
  name = getattr(fn, "__name__", None) or type(fn).__name__
  return default if name.startswith("<") else name


def _frozen_kwargs(apply_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """apply_kwargs as a sorted tuple of pairs: part of a function that must hash by value."""
  if apply_kwargs is None:
    return ()
  if not isinstance(apply_kwargs, Mapping):
    raise TypeError(f"apply_kwargs must be a dict of keyword arguments (e.g. {{'train': False}}), "
                    f"got {type(apply_kwargs).__name__}.")
  frozen = tuple(sorted(apply_kwargs.items()))
  try:
    hash(frozen)  # they become part of the compiled function's identity
  except TypeError:
    raise ValueError(f"apply_kwargs values must be hashable (bool, int, str, tuple), got "
                     f"{apply_kwargs}.") from None
  return frozen


def _is_linen_apply(fn: Any) -> bool:
  """Whether fn is a Linen module's bound ``apply``."""
  return isinstance(getattr(fn, "__self__", None), nn.Module) and fn.__name__ == "apply"


def _linen_model(apply_fn: Callable, variables: Any, label: str | None,
                 kwargs: tuple[tuple[str, Any], ...]) -> Model:
  """The Model of a Linen module, its bound apply, or any ``apply_fn(variables, x)``: a module
  (given or behind its apply) is kept by value, so equal modules give equal functions."""
  module = apply_fn if isinstance(apply_fn, nn.Module) else (
      apply_fn.__self__ if _is_linen_apply(apply_fn) else None)
  if module is not None:
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError(f"a Linen {type(module).__name__} needs its variables dict "
                       "({'params': ..., 'batch_stats': ...}, what module.init returns), not "
                       f"{type(variables).__name__} without a 'params' entry.")
    return Model(_LinenApply(module, kwargs), variables, label or type(module).__name__)
  fn = _WithKwargs(apply_fn, kwargs) if kwargs else apply_fn
  return Model(fn, variables, label or _name(apply_fn))


def as_model(obj: Any, variables: Any = None, *, label: str | None = None,
             apply_kwargs: Mapping[str, Any] | None = None) -> Model:
  """The `Model` of a logits function, an NNX module, a Linen pair or module, or a Model.

  Args:
    obj: ``logits_fn(x)``; an ``nnx.Module``; a Linen ``apply_fn`` or ``nn.Module`` (with
      `variables`), or an ``(apply_fn, variables)`` pair; or a `Model` (returned as it is).
    variables: the Linen variables (a pytree; kept traced). None for the other kinds.
    label: the model's name in reports; by default the function's or the module's class name.
    apply_kwargs: keywords of every forward call, e.g. ``{"train": False}`` for a Linen module
      whose BatchNorm follows a ``train`` flag (an NNX module is put in eval mode itself).

  Returns the Model; its `logits_fn` is ``images -> logits`` with the weights traced.
  """
  kwargs = _frozen_kwargs(apply_kwargs)
  if isinstance(obj, Model):
    if variables is not None or kwargs:
      raise ValueError("as_model got a Model plus variables or apply_kwargs; a Model already "
                       "holds both: pass it alone.")
    return obj if label is None else dataclasses.replace(obj, label=label)
  if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]) and variables is None:
    obj, variables = obj
  if isinstance(obj, nnx.Module):
    if variables is not None:
      raise ValueError("an NNX module holds its own weights: call as_model(module) without "
                       "variables.")
    # A view shares the arrays and leaves the user's module in whatever mode it was in.
    view = nnx.view(obj, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    return Model(_NNXApply(graphdef, kwargs), state, label or type(obj).__name__)
  if not callable(obj):
    raise TypeError(f"as_model takes a logits function, an NNX module, a Linen (apply_fn, "
                    f"variables) pair or module, or a Model; got {type(obj).__name__}.")
  if variables is not None or isinstance(obj, nn.Module) or _is_linen_apply(obj):
    return _linen_model(obj, variables, label, kwargs)
  fn = batching.as_pytree(obj)
  if kwargs:
    raise ValueError("apply_kwargs apply to a Linen or NNX model; bake them into a plain "
                     "logits function instead (e.g. functools.partial).")
  return Model(_call, fn, label or _name(obj))


def check_linen_taps(model: Model, analysis: str) -> None:
  """Raises ValueError unless `model` is a Linen-style ``apply_fn(variables, x, mutable=...)``:
  the analyses perturb layer inputs through the 'perturbations' collection of Linen taps
  (`penalty.tap`, `tap_module_inputs`), which a plain function or an NNX module lacks."""
  kind = ("a plain logits function" if model.apply_fn is _call
          else "an NNX module" if isinstance(model.apply_fn, _NNXApply) else None)
  if kind:
    raise ValueError(f"{analysis} perturbs layer inputs through Linen taps and {model.label} is "
                     f"{kind}: evaluate it with an attack or the checklist, or pass a Linen "
                     "(apply_fn, variables) whose model calls gfa_jax.tap.")

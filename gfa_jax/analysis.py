"""The GFA mechanism, measured: radial vs tangential sensitivity, loss landscapes, alignment.

GFA aligns the gradient ``g = dL/dh`` of a layer input ``h`` with ``h`` itself. The claimed
mechanism: the loss then changes mostly along the radial direction ``r = h / ||h||`` and is flat
in tangential directions (orthogonal to ``h``), which attacks would need. This module measures
that on any checkpoint:

- ``radial_tangential``: per image and tapped layer, the directional derivatives and the actual
  loss changes along ``r`` and along ``t``, the gradient's component orthogonal to ``h``
  (normalised), at equal L2 step sizes; and PGD restricted to the radial line vs to the
  tangential subspace (and unrestricted, for reference).
- ``loss_landscape``: the loss on a 2-D grid spanned by (r, t), plus random planes.
- ``alignment_table``: per-layer mean cosine between dL/dh and h per data split (the paper's
  Table 1), computed by ``gfa_objective``, the function training uses.

Deeper layers are perturbed through the model's taps (the ``'perturbations'`` collection the
``tap`` helper adds to every layer input), so no model is rewritten: perturbing ``layer1`` means
running the model with a non-zero tap there. All displacements are L2 in the coordinates of the
layer input and scale with its norm: a step of 0.05 moves ``h`` by ``0.05 * ||h||``. At
``layer0`` (the normalised image the first layer sees; ``2x - 1`` for the models here) that is
image space up to the model's normalisation, and no [0, 1] box is imposed: these are
measurements of the mechanism, not a threat model (``checklist`` evaluates threat models).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax import batching
from gfa_jax.numerics import check_batch, is_better, misclassified, resolve_loss
from gfa_jax.penalty import FEATURES, TAPS, gfa_objective, safe_norm, zero_taps

ApplyFn = Callable[..., Any]
LossArg = str | Callable[[jax.Array, jax.Array], jax.Array]
SUBSPACES = ("radial", "tangential", "full")
_TINY = 1e-30  # denominators of unit vectors; a zero vector then gives a zero direction


# --------------------------------------------------------------------------------------------
# Plumbing: a model as a function of its taps, unit directions, batching, summaries.


def _loss_of_taps(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array,
                  loss_fn: Callable) -> Callable:
  """``taps -> (per-example loss [B], (layer inputs {name: h}, logits))`` for the tap names."""
  def f(taps):
    logits, state = apply_fn({**variables, TAPS: taps}, x, mutable=[FEATURES])
    features = {name: state[FEATURES][name] for name in taps}
    return loss_fn(logits, y), (features, logits)
  return f


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(a.shape[0], -1)


def _unit(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows of v [B, D] scaled to unit L2 norm (zero rows stay zero), and the norms [B]."""
  norm = safe_norm(v)
  return v / jnp.maximum(norm, _TINY)[:, None], norm


def _remove_radial(v: jax.Array, r: jax.Array) -> jax.Array:
  """v minus its component along the unit rows r, [B, D]. Two Gram-Schmidt passes: after one,
  float rounding leaves a component along r of order eps * ||v||, which dominates the result
  (and its direction) when v is almost radial, the very case GFA aims for."""
  for _ in range(2):
    v = v - jnp.sum(v * r, axis=1, keepdims=True) * r
  return v


def _radial_tangential_basis(h: jax.Array, g: jax.Array):
  """For flat h, g [B, D]: r = h/||h||, d_r = <g, r>, t = unit(g - d_r r), d_t = <g, t> >= 0."""
  r, h_norm = _unit(h)
  d_r = jnp.sum(g * r, axis=1)
  t, d_t = _unit(_remove_radial(g, r))
  return r, t, d_r, d_t, h_norm


def _with_tap(taps: dict, name: str, delta_flat: jax.Array) -> dict:
  return {**taps, name: delta_flat.reshape(taps[name].shape)}


def _resolve(loss: LossArg) -> tuple[Callable, str]:
  fn = resolve_loss(loss)
  return fn, loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")


def _check_layers(apply_fn: ApplyFn, variables: Any, x: jax.Array,
                  layers: Sequence[str]) -> None:
  available = sorted(zero_taps(apply_fn, variables, x[:1]))
  if not available:
    raise ValueError("this model exposes no tapped layer inputs: call gfa_jax.tap on its layer "
                     "inputs or wrap it in gfa_jax.tap_module_inputs([...]).")
  missing = [name for name in layers if name not in available]
  if missing:
    raise ValueError(f"unknown layers {missing}; this model taps {available}.")


def _stats(values: np.ndarray) -> dict[str, float | None]:
  """mean, median, min, max of a 1-D array (None when empty), as plain floats for JSON."""
  values = np.asarray(values, np.float64)
  if not values.size:
    return {"mean": None, "median": None, "min": None, "max": None}
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "min": float(values.min()), "max": float(values.max())}


# --------------------------------------------------------------------------------------------
# Radial vs tangential.


def _subspace_pgd(f_delta: Callable, shape: tuple, r: jax.Array, radius: jax.Array,
                  y: jax.Array, subspace: str, steps: int):
  """L2 PGD on a layer-input perturbation delta [B, D], restricted to `subspace` of the clean
  input h: 'radial' (the line through r = h/||h||), 'tangential' (the complement of r) or
  'full'. Starts at 0, normalised-gradient steps of 2.5 * radius / steps, radius per example.

  Returns (best loss [B], fooled [B]): per example the best point over the start and all
  iterates (a misclassifying point beats one that is not, then higher loss).
  """
  def project(v):
    if subspace == "radial":
      return jnp.sum(v * r, axis=1, keepdims=True) * r
    return _remove_radial(v, r) if subspace == "tangential" else v

  def loss_and_grad(delta):
    def total(delta):
      loss, logits = f_delta(delta)
      return jnp.sum(loss), (loss, logits)
    (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(delta)
    return loss, misclassified(logits, y), grad

  step = (2.5 * radius / steps)[:, None]

  def body(_, carry):
    delta, best_loss, best_fooled = carry
    loss, fooled, grad = loss_and_grad(delta)
    better = is_better(loss, fooled, best_loss, best_fooled)
    best_loss = jnp.where(better, loss, best_loss)
    best_fooled = best_fooled | fooled
    direction, _ = _unit(project(grad))
    delta = project(delta + step * direction)
    scale = jnp.minimum(1.0, radius / jnp.maximum(safe_norm(delta), _TINY))
    return delta * scale[:, None], best_loss, best_fooled

  batch = shape[0]
  start = (jnp.zeros(shape), jnp.full((batch,), -jnp.inf), jnp.zeros((batch,), bool))
  delta, best_loss, best_fooled = jax.lax.fori_loop(0, steps, body, start)
  loss, fooled, _ = loss_and_grad(delta)
  better = is_better(loss, fooled, best_loss, best_fooled)
  return jnp.where(better, loss, best_loss), best_fooled | fooled


def _radial_tangential_batch(apply_fn, variables, x, y, *, layers, loss_fn, relative_steps,
                             pgd_layer, pgd_radius, pgd_steps):
  """Per-example arrays for one batch (see radial_tangential for their meaning)."""
  names = tuple(dict.fromkeys((*layers, *([pgd_layer] if pgd_layer else []))))
  taps = zero_taps(apply_fn, variables, x, names=names)
  f = _loss_of_taps(apply_fn, variables, x, y, loss_fn)
  loss0, vjp_fn, (features, logits) = jax.vjp(f, taps, has_aux=True)
  (grads,) = vjp_fn(jnp.ones_like(loss0))
  out = {"loss": loss0, "correct": ~misclassified(logits, y), "layers": {}}
  for name in layers:
    h, g = _flat(features[name]), _flat(grads[name])
    r, t, d_r, d_t, h_norm = _radial_tangential_basis(h, g)
    # Ascend along the radial line: outward if the loss grows outward, else inward.
    r_ascent = jnp.where(d_r >= 0, 1.0, -1.0)[:, None] * r
    changes = {}
    for rel in relative_steps:
      rho = (rel * h_norm)[:, None]
      changes[f"{rel:g}"] = {
          "radial": f(_with_tap(taps, name, rho * r_ascent))[0] - loss0,
          "tangential": f(_with_tap(taps, name, rho * t))[0] - loss0}
    out["layers"][name] = {
        "radial_derivative": d_r, "tangential_derivative": d_t, "gradient_norm": safe_norm(g),
        "feature_norm": h_norm, "cosine": d_r / jnp.maximum(safe_norm(g), _TINY),
        "loss_change": changes}
  if pgd_layer:
    h = _flat(features[pgd_layer])
    r, h_norm = _unit(h)
    radius = pgd_radius * h_norm

    def f_delta(delta):
      loss, (_, logits) = f(_with_tap(taps, pgd_layer, delta))
      return loss, logits

    out["pgd"] = {"radius": radius}
    for subspace in SUBSPACES:
      best_loss, fooled = _subspace_pgd(f_delta, h.shape, r, radius, y, subspace, pgd_steps)
      out["pgd"][subspace] = {"loss_increase": best_loss - loss0, "fooled": fooled}
  return out


def radial_tangential(apply_fn: ApplyFn, variables: Any, x, y, *,
                      layers: Sequence[str] = ("layer0", "layer1", "layer2"),
                      loss: LossArg = "ce", relative_steps: Sequence[float] = (0.01, 0.05, 0.1),
                      pgd_layer: str | None = "layer0", pgd_radius: float = 0.05,
                      pgd_steps: int = 20, batch_size: int = 256,
                      return_per_example: bool = False) -> dict[str, Any]:
  """Radial vs tangential sensitivity of the loss at each tapped layer input, per image.

  For image i and layer input h (flattened) with g = dL_i/dh (L_i: `loss` of image i):
    radial derivative      d_r = <g, r>, r = h / ||h||   (signed)
    tangential derivative  d_t = <g, t> = ||g - d_r r||,  t = (g - d_r r) / ||g - d_r r||
  so |d_r| = ||g|| |cos(g, h)| and d_t = ||g|| sin: GFA's alignment (cos -> 1) shrinks d_t.
  Loss changes at equal L2 norms: for each s in `relative_steps`, L(h + s||h|| r_up) - L(h)
  with r_up = sign(d_r) r (ascending radially) and L(h + s||h|| t) - L(h).
  PGD at `pgd_layer` (layer0 = the image, after the model's normalisation): L2 ball of radius
  `pgd_radius * ||h||`, `pgd_steps` normalised-gradient steps from h, restricted to the radial
  line, to the tangential subspace, or unrestricted; reported among correctly classified
  images: success rate and loss increase.

  Returns a JSON-ready dict: 'layers' {name: {'radial_derivative' (of |d_r|),
  'tangential_derivative', 'tangential_over_radial' (d_t / |d_r|), 'cosine', 'gradient_norm',
  'feature_norm', 'loss_change' {f'{s:g}': {'radial', 'tangential', 'tangential_larger'
  (fraction of images)}}}}, each a {'mean','median','min','max'} summary over images; 'pgd'
  {subspace: {'success_rate', 'loss_increase'}} plus 'radius'; and the settings. With
  `return_per_example`, 'per_example' holds the raw arrays (numpy, not JSON).
  """
  x, y = check_batch(x, y)
  _check_layers(apply_fn, variables, x, (*layers, *([pgd_layer] if pgd_layer else [])))
  if pgd_steps < 1:
    raise ValueError(f"pgd_steps must be >= 1, got {pgd_steps}.")
  if not relative_steps or min(relative_steps) <= 0:
    raise ValueError(f"relative_steps must be positive fractions of ||h||, got {relative_steps}.")
  loss_fn, loss_name = _resolve(loss)
  batch_fn = jax.jit(lambda v, xb, yb: _radial_tangential_batch(
      apply_fn, v, xb, yb, layers=tuple(layers), loss_fn=loss_fn,
      relative_steps=tuple(relative_steps), pgd_layer=pgd_layer, pgd_radius=pgd_radius,
      pgd_steps=pgd_steps))
  raw = batching.map_batches(functools.partial(batch_fn, variables), [x, y], batch_size)
  result: dict[str, Any] = {
      "loss": loss_name, "num_examples": int(len(x)),
      "clean_accuracy": float(raw["correct"].mean()),
      "relative_steps": [float(s) for s in relative_steps],
      "units": "L2 displacement of the layer input, as a fraction of ||h|| per image",
      "layers": {}}
  for name, per in raw["layers"].items():
    abs_radial = np.abs(per["radial_derivative"])
    ratio = per["tangential_derivative"] / np.maximum(abs_radial, 1e-30)
    changes = {}
    for step, both in per["loss_change"].items():
      changes[step] = {"radial": _stats(both["radial"]), "tangential": _stats(both["tangential"]),
                       "tangential_larger": float(np.mean(both["tangential"] > both["radial"]))}
    result["layers"][name] = {
        "radial_derivative": _stats(abs_radial),
        "tangential_derivative": _stats(per["tangential_derivative"]),
        "tangential_over_radial": _stats(ratio), "cosine": _stats(per["cosine"]),
        "gradient_norm": _stats(per["gradient_norm"]),
        "feature_norm": _stats(per["feature_norm"]), "loss_change": changes}
  if pgd_layer:
    correct = raw["correct"]
    result["pgd"] = {
        "layer": pgd_layer, "norm": "l2", "relative_radius": float(pgd_radius),
        "steps": int(pgd_steps), "radius": _stats(raw["pgd"]["radius"]),
        "num_correct": int(correct.sum())}
    for subspace in SUBSPACES:
      run = raw["pgd"][subspace]
      result["pgd"][subspace] = {
          "success_rate": float(run["fooled"][correct].mean()) if correct.any() else None,
          "loss_increase": _stats(run["loss_increase"][correct])}
  if return_per_example:
    result["per_example"] = raw
  return result


# --------------------------------------------------------------------------------------------
# Loss landscape.


def _landscape_batch(apply_fn, variables, x, y, key, *, layer, loss_fn, coordinates,
                     random_planes):
  """Loss grids [B, n, n] per plane for one batch (see loss_landscape)."""
  taps = zero_taps(apply_fn, variables, x, names=(layer,))
  f = _loss_of_taps(apply_fn, variables, x, y, loss_fn)
  loss0, vjp_fn, (features, _) = jax.vjp(f, taps, has_aux=True)
  (grads,) = vjp_fn(jnp.ones_like(loss0))
  h = _flat(features[layer])
  r, t, _, d_t, h_norm = _radial_tangential_basis(h, _flat(grads[layer]))
  planes = {"radial_tangential": (r, t)}
  for k in range(random_planes):
    u, v = jax.random.normal(jax.random.fold_in(key, k), (2, *h.shape))
    u, _ = _unit(u)
    v, _ = _unit(_remove_radial(v, u))
    planes[f"random_{k}"] = (u, v)
  grid = jnp.stack(jnp.meshgrid(coordinates, coordinates, indexing="ij"), -1).reshape(-1, 2)

  def loss_at(ab, u, v):
    delta = h_norm[:, None] * (ab[0] * u + ab[1] * v)
    return f(_with_tap(taps, layer, delta))[0]

  n = len(coordinates)
  out = {name: jax.lax.map(lambda ab: loss_at(ab, u, v), grid).T.reshape(-1, n, n)
         for name, (u, v) in planes.items()}
  return {"grids": out, "clean_loss": loss0, "tangential_is_zero": d_t == 0}


def loss_landscape(apply_fn: ApplyFn, variables: Any, x, y, *, key: jax.Array,
                   layer: str = "layer0", loss: LossArg = "ce", extent: float = 0.1,
                   num: int = 21, random_planes: int = 1, batch_size: int = 64,
                   ) -> dict[str, Any]:
  """Loss of each image on 2-D grids around its layer input h (the paper's Figure 2, with axes).

  Planes through h, coordinates (a, b) in [-extent, extent] on `num` points each, the loss at
  h + ||h|| (a u + b v):
    'radial_tangential': u = r = h/||h|| (outward), v = t, the unit tangential component of
      dL/dh (so the loss rises along +v to first order);
    'random_k': u, v orthonormal Gaussian directions (per image).
  Returns a JSON-ready dict: 'layer', 'loss', 'units', 'coordinates' [num], 'num_points',
  'clean_loss' [B], 'planes' {name: {'axes': [u label, v label], 'loss' [B][num][num]
  (first index along u), 'mean_loss' [num][num]}}; 'tangential_is_zero' counts images whose
  gradient has no tangential part (their v is 0, the plane degenerates to a line). Drawn by
  ``plots.plot_landscapes`` (the mechanism evaluator does).
  """
  x, y = check_batch(x, y)
  _check_layers(apply_fn, variables, x, (layer,))
  if num < 3 or extent <= 0:
    raise ValueError(f"need num >= 3 grid points and extent > 0, got num={num}, "
                     f"extent={extent}.")
  loss_fn, loss_name = _resolve(loss)
  coordinates = np.linspace(-extent, extent, num, dtype=np.float32)
  batch_fn = jax.jit(lambda v, xb, yb, k: _landscape_batch(
      apply_fn, v, xb, yb, k, layer=layer, loss_fn=loss_fn, coordinates=coordinates,
      random_planes=random_planes))
  # Batch i draws its random planes from fold_in(key, i).
  raw = batching.map_batches(functools.partial(batch_fn, variables), [x, y], batch_size, key=key)
  axes = {"radial_tangential": ["radial r = h/||h||",
                                "tangential t (gradient part orthogonal to h)"]}
  axes.update({f"random_{k}": [f"random direction u{2 * k + 1}", f"random direction u{2 * k + 2}"]
               for k in range(random_planes)})
  landscape = {
      "layer": layer, "loss": loss_name,
      "units": "fraction of ||h||, L2", "coordinates": coordinates.tolist(),
      "num_points": int(len(x)), "clean_loss": raw["clean_loss"].tolist(),
      "tangential_is_zero": int(raw["tangential_is_zero"].sum()),
      "planes": {name: {"axes": axes[name], "loss": grids.tolist(),
                        "mean_loss": grids.mean(axis=0).tolist()}
                 for name, grids in raw["grids"].items()}}
  return landscape


# --------------------------------------------------------------------------------------------
# Alignment table.


def alignment_table(apply_fn: ApplyFn, variables: Any,
                    splits: Mapping[str, tuple[Any, Any]],
                    task_loss: Callable[[jax.Array, jax.Array], jax.Array], *,
                    layers: Sequence[str] | None = None,
                    batch_size: int = 500) -> dict[str, dict[str, float]]:
  """Per-layer mean cosine between dL/dh and h, per data split (the paper's Table 1).

  The cosines come from ``gfa_objective`` (hence ``gfa_penalty``), the code GFA training runs,
  with `task_loss` the run's batch loss ``(logits, y) -> scalar``. Per image the cosine does not
  depend on the other images of its batch (the loss is a mean over images, and a cosine does
  not see the 1/B), so the table is the mean over all images of their cosines. `layers`: tap names, default every tapped layer input.

  Returns ``{split: {layer: mean cosine}}`` (plain floats, JSON-ready).
  """
  if not splits:
    raise ValueError('splits is empty: pass e.g. {"train": (x, y), "test": (x, y)}.')
  splits = {name: check_batch(x, y) for name, (x, y) in splits.items()}
  x_any = next(iter(splits.values()))[0]
  layers = tuple(sorted(zero_taps(apply_fn, variables, x_any[:1])) if layers is None else layers)
  _check_layers(apply_fn, variables, x_any, layers)
  # Per-image cosines: padded rows of the last batch are dropped before the mean (the padding
  # only rescales the batch loss, which a cosine does not see).
  # A model with state (BatchNorm's running averages) runs in its default, inference mode.
  batch_fn = jax.jit(lambda p, s, xb, yb: gfa_objective(
      apply_fn, p, xb, yb, task_loss, layers=layers, state=s)[1]["cosines"])
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  table = {}
  for split, (x, y) in splits.items():
    cosines = batching.map_batches(functools.partial(batch_fn, params, state), [x, y],
                                   batch_size)
    table[split] = {name: float(np.mean(cosines[name])) for name in layers}
  return table

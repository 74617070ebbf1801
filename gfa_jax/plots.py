"""Every figure gfa-jax draws: line plots, loss landscapes, radial-vs-tangential bars.

Readable without colour vision: the Okabe & Ito (2008) palette, plus a distinct marker and line
style per series, and the perceptually uniform, colour-blind-safe 'cividis' map for surfaces.
Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) instead of pyplot, so drawing
never switches the caller's backend or touches global state. Every axis names its quantity and
unit; a function that cannot know the unit takes the label from its caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

# Okabe & Ito (2008): blue, orange, bluish green, vermillion, reddish purple, sky blue, yellow,
# black. Yellow is last but one because it is faint on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
           "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
SURFACE_CMAP = "cividis"


def series_style(i: int) -> dict[str, Any]:
  """Colour, marker and line style of the i-th series; all three differ between neighbours,
  and after the palette runs out the marker and line style shift, so series i and i + 8
  still differ."""
  cycle = i // len(PALETTE)
  return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[(i + cycle) % len(MARKERS)],
          "linestyle": LINESTYLES[(i + cycle) % len(LINESTYLES)]}


def _save(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  return path


def _draw_lines(ax, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str, title: str | None, logx: bool,
                ylim: tuple[float, float] | None, reference_lines: Mapping[str, float] | None,
                markevery: int | float | None, xticks: Sequence[float] | None = None,
                style_index: Mapping[str, int] | None = None) -> None:
  for i, (label, (xs, ys)) in enumerate(curves.items()):
    style = series_style(i if style_index is None else style_index[label])
    ax.plot(xs, ys, label=label, markevery=markevery, markersize=5, **style)
  for j, (label, value) in enumerate((reference_lines or {}).items()):
    ax.axhline(value, color="0.45", linestyle=LINESTYLES[(j + 1) % len(LINESTYLES)],
               linewidth=1, label=label)
  if logx:
    ax.set_xscale("log")
  if xticks is not None:  # Label the measured values themselves (log axes show only decades).
    ax.set_xticks(list(xticks), [f"{v:g}" for v in xticks])
    ax.minorticks_off()
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def plot_lines(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               *, xlabel: str, ylabel: str, title: str | None = None, logx: bool = False,
               ylim: tuple[float, float] | None = None,
               reference_lines: Mapping[str, float] | None = None,
               markevery: int | float | None = None) -> Path:
  """Line plot of ``{label: (xs, ys)}``; ``reference_lines`` ``{label: y}`` are drawn as grey
  horizontal lines (e.g. chance level). Returns the PNG's path."""
  fig = Figure(figsize=(6, 4.2))
  _draw_lines(fig.add_subplot(), curves, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx,
              ylim=ylim, reference_lines=reference_lines, markevery=markevery)
  return _save(fig, path)


def plot_panels(path: str | Path,
                panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                *, xlabel: str, logx: bool = False, ylim: tuple[float, float] | None = None,
                reference_lines: Mapping[str, Mapping[str, float]] | None = None,
                xticks: Sequence[float] | None = None, ncols: int | None = None) -> Path:
  """Line plots, one per ``{ylabel: curves}`` entry, in rows of ``ncols`` (default: one row).
  A series keeps its style in every panel, also where a panel lacks other series (so one series
  is one colour throughout); ``reference_lines`` maps a panel's ylabel to its grey lines;
  ``xticks`` labels those x values. Returns the PNG's path."""
  style_index = {}
  for curves in panels.values():
    for label in curves:
      style_index.setdefault(label, len(style_index))
  ncols = ncols or len(panels)
  nrows = -(-len(panels) // ncols)
  fig = Figure(figsize=(5 * ncols, 4.2 * nrows))
  for k, (ylabel, curves) in enumerate(panels.items()):
    _draw_lines(fig.add_subplot(nrows, ncols, k + 1), curves, xlabel=xlabel, ylabel=ylabel,
                title=None, logx=logx, ylim=ylim,
                reference_lines=(reference_lines or {}).get(ylabel), markevery=None,
                xticks=xticks, style_index=style_index)
  return _save(fig, path)


def plot_landscapes(path: str | Path, landscapes: Mapping[str, Mapping[str, Any]]) -> Path:
  """Loss surfaces from ``analysis.loss_landscape``, one row per model, one column per plane.

  ``landscapes`` maps a model label (e.g. 'standard', 'GFA-DEEP') to a landscape dict; all of
  them must have the same planes. Each panel shows the mean loss over the landscape's points
  with its own colour scale and colour bar (models' losses can differ by orders of magnitude,
  a shared scale would flatten one of them); a cross marks the clean point.
  """
  labels = list(landscapes)
  if not labels:
    raise ValueError("plot_landscapes needs at least one landscape.")
  planes = list(landscapes[labels[0]]["planes"])
  for label in labels[1:]:
    if list(landscapes[label]["planes"]) != planes:
      raise ValueError(f'landscape {label!r} has planes {list(landscapes[label]["planes"])}, '
                       f'{labels[0]!r} has {planes}: compute them with the same settings.')
  fig = Figure(figsize=(3.6 * len(planes) + 0.8, 3.2 * len(labels)))
  axes = fig.subplots(len(labels), len(planes), squeeze=False)
  for row, label in enumerate(labels):
    land = landscapes[label]
    coords = np.asarray(land["coordinates"])
    for col, plane in enumerate(planes):
      grid = np.asarray(land["planes"][plane]["mean_loss"])
      ax = axes[row, col]
      image = ax.contourf(coords, coords, grid.T, levels=20, cmap=SURFACE_CMAP)
      ax.contour(coords, coords, grid.T, levels=10, colors="k", linewidths=0.4, alpha=0.5)
      ax.plot([0], [0], marker="x", color="#D55E00", markersize=8)
      first, second = land["planes"][plane]["axes"]
      ax.set_xlabel(f'{first}\n({land["units"]})', fontsize=8)
      ax.set_ylabel(f'{second}\n({land["units"]})', fontsize=8)
      ax.set_title(f'{label}: {plane} at {land["layer"]}', fontsize=9)
      colorbar = fig.colorbar(image, ax=ax, format="%.6g")  # no offset text over the title
      colorbar.set_label(f'mean {land["loss"]} loss, {land["num_points"]} points', fontsize=8)
  return _save(fig, path)


def plot_radial_tangential(path: str | Path, results: Mapping[str, Mapping[str, Any]],
                           *, relative_step: float | None = None) -> Path:
  """Grouped bars from ``analysis.radial_tangential``: per model and layer, the mean loss
  increase along the (ascending) radial direction and along the tangential gradient direction,
  at the same L2 step (a fraction of ||h||; the largest computed step unless given)."""
  fig = Figure(figsize=(9, 4.2))
  ax = fig.add_subplot()
  labels = list(results)
  layers = list(results[labels[0]]["layers"])
  steps = results[labels[0]]["relative_steps"]
  step = max(steps) if relative_step is None else relative_step
  if step not in steps:
    raise ValueError(f"relative_step {step} was not computed; choose one of {steps}.")
  key = f"{step:g}"
  width = 0.8 / (2 * len(labels))
  i, all_values = 0, [1e-12]
  for label in labels:
    for direction in ("radial", "tangential"):
      values = [results[label]["layers"][layer]["loss_change"][key][direction]["mean"]
                for layer in layers]
      all_values += values
      offsets = np.arange(len(layers)) - 0.4 + width * (i + 0.5)
      style = series_style(i)
      ax.bar(offsets, values, width, label=f"{label}: {direction}", color=style["color"],
             hatch=("", "//", "..", "xx")[i % 4], edgecolor="k", linewidth=0.5)
      i += 1
  # Models' loss changes can differ by orders of magnitude: log scale, linear near 0 (the
  # radial change can be negative where the loss curves down).
  ax.set_yscale("symlog", linthresh=1e-3 * max(abs(v) for v in all_values))
  ax.set_xticks(np.arange(len(layers)), layers)
  ax.set_xlabel("tapped layer input h")
  loss = results[labels[0]]["loss"]
  ax.set_ylabel(f"mean {loss} loss increase\nat an L2 step of {step:g} * ||h|| (symlog)")
  ax.axhline(0, color="k", linewidth=0.6)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return _save(fig, path)

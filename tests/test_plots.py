"""Figures: distinguishable series, and one style per series across panels."""

import itertools

from matplotlib.colors import to_hex

from gfa_jax import plots


def test_series_styles_are_distinct_beyond_the_palette():
  styles = [plots.series_style(i) for i in range(16)]
  keys = [(s["color"], s["marker"], s["linestyle"]) for s in styles]
  assert len(set(keys)) == 16  # Series 0 and 8 share a colour, not a marker or line style.
  for a, b in itertools.pairwise(styles):
    assert all(a[k] != b[k] for k in ("color", "marker", "linestyle"))


def test_plot_panels_keeps_a_series_style_when_a_panel_lacks_others(tmp_path, monkeypatch):
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
  line = ([1, 2, 4], [0.5, 0.3, 0.1])
  panels = {"PGD": {"a": line, "b": line, "c": line}, "APGD": {"c": line}}
  plots.plot_panels(tmp_path / "p.png", panels, xlabel="eps", logx=True, xticks=[1, 2, 4])
  first, second = figures[0].axes
  colour = lambda ax, label: next(to_hex(l.get_color()) for l in ax.lines
                                  if l.get_label() == label)
  assert colour(second, "c") == colour(first, "c") == plots.series_style(2)["color"].lower()
  assert [t.get_text() for t in first.get_xticklabels()] == ["1", "2", "4"]


def test_plot_panels_wraps_into_rows_of_ncols(tmp_path, monkeypatch):
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
  line = ([1, 2], [0.5, 0.3])
  plots.plot_panels(tmp_path / "p.png", {f"panel {k}": {"a": line} for k in range(5)},
                    xlabel="eps", ncols=3)
  geometry = [ax.get_subplotspec().get_geometry()[:2] for ax in figures[0].axes]
  assert geometry == [(2, 3)] * 5

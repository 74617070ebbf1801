"""Everything gfa-jax writes about an evaluation: JSON, Markdown, plots, terminal summaries.

Evaluators return plain dicts; this module turns them into files (always atomically, strict
JSON without NaN) and lines, so no evaluator opens a file or formats a table itself.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gfa_jax import plots


def write_atomically(path: str | Path, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and a rename, so a
  reader (or a crash) never sees a half-written file."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # a full disk leaves no temporary file behind
    raise


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
  """Strict JSON (NaN or infinity raise instead of writing invalid JSON), atomically; creates
  the folder."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_atomically(path, json.dumps(obj, indent=indent, allow_nan=False).encode())
  return path


def pct(fraction: float | None) -> str:
  return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


# --------------------------------------------------------------------------------------------
# Attacks (evaluate.evaluate's report).


def attack_summary(report: dict) -> str:
  """A few lines for the terminal from `evaluate.evaluate`'s report; the JSON has everything."""
  lines = [f"clean accuracy {100 * report['clean_accuracy']:.2f}% "
           f"on {report['num_examples']} examples ({report['norm']})"]
  eps_text = ", ".join(f"{e:.4g}" for e in report["eps"])
  for name, r in report["attacks"].items():
    if r["kind"] == "l0":
      acc = f"{100 * r['robust_accuracy'][0]:.2f}% with {r['threat_model']['pixels']} pixel(s)"
    else:
      acc = ", ".join(f"{100 * a:.2f}%" for a in r["robust_accuracy"]) + f" at eps [{eps_text}]"
    extra = ""
    if r["kind"] == "min_norm":
      median = r["norms"][report["norm"]]["median"]
      extra = f"; success {100 * r['success_rate']:.1f}%, median {report['norm']} " + (
          "n/a" if median is None else f"{median:.4g}")
    if "label" in r:
      extra += f"; {r['label']}"
    if "not_run" in r:
      extra += f"; NOT RUN: {r['not_run']}, so robust = clean"
    lines.append(f"{name:>10}: robust {acc}{extra}  ({r['elapsed_seconds']:.1f} s)")
    for eps_value, checks in zip(report["eps"], r.get("checks", [])):
      lines += [f"{'':>12}check {c['check']} at eps {eps_value:.4g}: WARNING {c['message']}"
                for c in checks if c["status"] == "warn"]
  if report["attack"] == "all":
    lines.append(f"{'worst case':>10}: robust "
                 + ", ".join(f"{100 * a:.2f}%" for a in report["robust_accuracy"]))
  for name, reason in report["skipped"].items():
    lines.append(f"{name:>10}: skipped ({reason})")
  lines += [f"WARNING: check {c['check']}: {c['message']}"
            for c in report.get("model_checks", []) if c["status"] == "warn"]
  if report.get("degenerate"):
    lines.append(f"WARNING: this model is {report['degenerate']}")
  return "\n".join(lines)


def plot_robust_accuracy(report: dict, path: str | Path) -> Path:
  """Robust accuracy vs eps, one line per attack (plus the worst case for 'all'), as a PNG with
  the clean accuracy as a reference line; colour-blind-safe styles from gfa_jax.plots."""
  # Linf radii read best in pixel levels (8/255 -> 8); l2 and l1 radii as they are.
  scale, unit = (255, " x 255") if report["norm"] == "linf" else (1, "")
  eps = [scale * e for e in report["eps"]]
  percent = lambda values: [100 * v for v in values]
  curves = {name: (eps, percent(r["robust_accuracy"]))
            for name, r in report["attacks"].items() if r["kind"] != "l0"}
  if report["attack"] == "all" and curves:
    curves["worst case"] = (eps, percent(report["robust_accuracy"]))
  return plots.plot_lines(
      path, curves, xlabel=f'eps{unit} ({report["norm"]}, images in [0, 1])',
      ylabel=f'robust accuracy (%) over {report["num_examples"]} test images', ylim=(-2, 102),
      reference_lines={"clean accuracy": 100 * report["clean_accuracy"]})


# --------------------------------------------------------------------------------------------
# The gradient-masking checklist.


def write_checklist(report: dict, out_dir: Path) -> dict[str, str]:
  """Draws the plots, writes checklist.md and checklist.json (strict JSON, no NaN, written
  atomically); returns {what: file name}."""
  out_dir.mkdir(parents=True, exist_ok=True)
  sweep = report["checks"][0]["numbers"]
  curves = {name: (sweep["eps"], [100 * a for a in acc])
            for name, acc in sweep["robust_accuracy"].items()}
  curves["worst case"] = (sweep["eps"], [100 * a for a in sweep["worst_case"]])
  plots.plot_lines(
      out_dir / "eps_sweep.png", curves, logx=True, ylim=(-2, 102),
      xlabel=f'eps ({report["norm"]} radius, images in [0, 1]; log scale)',
      ylabel=f'robust accuracy (%) of {report["num_examples"]} test images',
      title="Check 1/2: robust accuracy must reach 0% (or chance) as eps grows",
      reference_lines={"clean accuracy": 100 * report["clean_accuracy"],
                       "chance": 100 * sweep["chance"]})
  traces = {name: (np.arange(1, len(t)), t[1:])
            for name, t in report["convergence_trace"].items()}
  plots.plot_lines(
      out_dir / "convergence.png", traces, logx=True, markevery=0.1,
      xlabel="APGD-CE iteration (log scale)",
      ylabel="best cross-entropy so far (nats)\nmean over attacked points",
      title=f'Check 4: convergence at eps {report["eps_text"]} ({report["norm"]})')
  files = {"json": "checklist.json", "markdown": "checklist.md",
           "eps_sweep": "eps_sweep.png", "convergence": "convergence.png"}
  write_atomically(out_dir / "checklist.md", checklist_markdown(report, files).encode())
  write_json(out_dir / "checklist.json", {**report, "files": files}, indent=1)
  return files


def _md_number(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_md_number(v) for v in value) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {_md_number(v)}" for k, v in value.items()) + "}"
  return str(value)


def checklist_markdown(report: Mapping[str, Any], files: Mapping[str, str] | None = None) -> str:
  """The report as Markdown: a summary table, then each check's verdict and numbers."""
  s = report["summary"]
  lines = [
      "# Gradient-masking checklist", "",
      f'Threat model: {report["norm"]} eps = {report["eps_text"]}; {report["num_examples"]} '
      f'examples, {report["num_classes"]} classes; budget `{report["budget"]}`.', "",
      f'Clean accuracy **{pct(report["clean_accuracy"])}**; robust accuracy **'
      f'{pct(report["robust_accuracy"])}** (per-example worst case over '
      f'{len(report["attacks"])} attack runs at eps). Checks: {s["PASS"]} PASS, {s["WARN"]} WARN, '
      f'{s["FAIL"]} FAIL.', "",
      "| # | check | status |", "|---|---|---|"]
  lines += [f'| {c["id"]} | {c["name"]} | **{c["status"]}** |' for c in report["checks"]]
  lines += ["", "## Robust accuracy at eps per attack run", "", "| attack | robust accuracy |",
            "|---|---|"]
  lines += [f"| {name} | {pct(acc)} |" for name, acc in report["attacks"].items()]
  figures = {1: "eps_sweep", 4: "convergence"}
  for c in report["checks"]:
    lines += ["", f'## {c["id"]}. {c["name"]}: {c["status"]}', "", c["verdict"], ""]
    lines += [f"- {k}: {_md_number(v)}" for k, v in c["numbers"].items()]
    if files and c["id"] in figures:
      lines += ["", f'![{figures[c["id"]]}]({files[figures[c["id"]]]})']
  budget = ", ".join(f"{k}={v}" for k, v in report["budget_settings"].items())
  lines += ["", f'Budget: {budget}. Seed {report["seed"]}.', ""]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Analyses.


def alignment_markdown(table: Mapping[str, Mapping[str, float]]) -> str:
  """``alignment_table``'s result as a Markdown table, one row per split, one column per layer."""
  layers = list(next(iter(table.values())))
  lines = ["| split | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
  lines += [f"| {split} | " + " | ".join(f"{row[name]:+.4f}" for name in layers) + " |"
            for split, row in table.items()]
  return "\n".join(lines)


def write_mechanism(report: Mapping[str, Any], folder: Path) -> list[Path]:
  """mechanism.json and its two figures (radial vs tangential, loss landscapes), one curve or
  panel per model of report['models']; returns the paths written."""
  folder.mkdir(parents=True, exist_ok=True)
  per_model = report["models"]
  plots.plot_radial_tangential(folder / "radial_tangential.png",
                               {k: v["radial_tangential"] for k, v in per_model.items()})
  plots.plot_landscapes(folder / "landscape.png", {k: v["landscape"] for k, v in per_model.items()})
  return [write_json(folder / "mechanism.json", report),
          folder / "radial_tangential.png", folder / "landscape.png"]


# --------------------------------------------------------------------------------------------
# The quickstart (gfa_jax.quickstart's summary).


def write_quickstart(summary: Mapping[str, Any], folder: Path) -> dict[str, str]:
  """quickstart.png (test accuracy and mean train alignment over training, side by side, one
  curve per run) and summary.json (the summary with these files); returns {what: path}."""
  runs = summary["runs"]
  files = {"summary": str(folder / "summary.json"), "plot": str(folder / "quickstart.png")}
  accuracy, alignment = "test accuracy (%)", "mean train alignment (cosine)"
  plots.plot_panels(
      files["plot"],
      {accuracy: {r["name"]: (r["curves"]["step"], [100 * a for a in r["curves"]["test_accuracy"]])
                  for r in runs},
       alignment: {r["name"]: (r["curves"]["step"], r["curves"]["train_alignment"])
                   for r in runs if None not in r["curves"]["train_alignment"]}},
      xlabel="training step",
      reference_lines={accuracy: {"chance": 100 / runs[0]["num_classes"]},
                       alignment: {"no alignment": 0.0}})
  write_json(files["summary"], {**summary, "files": files}, indent=1)
  return files


def quickstart_lines(summary: Mapping[str, Any]) -> list[str]:
  """The quickstart's table (one row per run: clean and robust accuracy, train alignment per
  layer, collapsed or not), its reading and the files written, as terminal lines."""
  runs = summary["runs"]
  first = runs[0]
  layers = list(dict.fromkeys(name for r in runs for name in r["train_alignment"]))
  lines = [f'data: {first["data"]}',
           f'clean, robust: accuracy on the first {first["num_examples"]} test images, robust '
           f'under {first["attack"]} at {first["norm"]} {first["eps_text"]}',
           *[f"{layers[0]}..{layers[-1]}: train alignment, the cosine of the loss gradient and "
             "each layer's input"] * bool(layers), "",
           f'{"run":<22} {"objective":<15} {"steps":>5} {"clean":>6} {"robust":>6}  '
           + " ".join(f"{name:>6}" for name in layers) + "  collapsed"]
  for r in runs:
    objective = r["objective"] + (f', beta {r["beta"]:g}' if r["beta"] is not None else "")
    cosines = " ".join(f"{r['train_alignment'][name]:>+6.2f}" if name in r["train_alignment"]
                       else f'{"-":>6}' for name in layers)
    collapsed = (r["degenerate"].split(":")[0].replace("collapsed", "yes") if r["degenerate"]
                 else "no")
    lines.append(f'{r["name"]:<22} {objective:<15} {r["steps"]:>5} '
                 f'{pct(r["clean_accuracy"]):>6} {pct(r["robust_accuracy"]):>6}  {cosines}  '
                 f"{collapsed}")
  lines += ["", *(wrapped for line in summary["reading"]
                 for wrapped in textwrap.wrap(line, 100, subsequent_indent="  ")), ""]
  lines += [f"wrote {path}" for path in summary["files"].values()]
  return lines

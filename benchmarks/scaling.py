"""How the train step scales: time per image vs batch size and model, GFA-DEEP vs standard.

    python -m benchmarks.scaling                                    # 3 models x batch 32..512
    python -m benchmarks.scaling --models small_cnn --batches 32,128

Each point (model, batch) is one interleaved run of train_step.py's ``standard`` and
``gfa_deep`` cases (``train_lib``'s step, the flags train.py sets), so the GFA-DEEP / standard
ratio of a point is measured in one run; points are measured one after another, so compare
their absolute times only as a curve taken on a quiet machine. Prints each case's JSON record
(with ``model`` and ``batch``), one ``point`` line per point, and a Markdown table at the end.
Models: SmallCNN and ResNet-20 as train.py builds them, and the validation's ResNet-18
(``torch_import.TorchResNet18``, BatchNorm with fixed statistics: train_step.FixedStats).
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import common

CASES = ("standard", "gfa_deep")


def point(records: list[dict]) -> dict:
  """The ``point`` line of one (model, batch) run: ms per image of each case and their ratio."""
  by = {r["name"]: r for r in records}
  per_image = {n: round(by[n]["ms_per_step"] / by[n]["batch"], 3) for n in CASES}
  first = by[CASES[0]]
  return {"name": "point", "model": first["model"], "batch": first["batch"],
          **{f"{n}_ms_per_image": v for n, v in per_image.items()},
          "gfa_deep_over_standard": round(per_image["gfa_deep"] / per_image["standard"], 3),
          **{f"{n}_gflop_per_s": by[n].get("gflop_per_s") for n in CASES},
          **{f"{n}_peak_rss_mb": by[n]["peak_rss_mb"] for n in CASES}}


def table(points: list[dict]) -> str:
  """The points as a Markdown table, one row per (model, batch)."""
  rows = ["| model | batch | standard ms/image | GFA-DEEP ms/image | GFA-DEEP / standard "
          "| GFLOP/s standard / GFA-DEEP | peak RSS MB standard / GFA-DEEP |",
          "|---|---|---|---|---|---|---|"]
  rows += [f"| {p['model']} | {p['batch']} | {p['standard_ms_per_image']} | "
           f"{p['gfa_deep_ms_per_image']} | {p['gfa_deep_over_standard']} | "
           f"{p['standard_gflop_per_s']} / {p['gfa_deep_gflop_per_s']} | "
           f"{p['standard_peak_rss_mb']:.0f} / {p['gfa_deep_peak_rss_mb']:.0f} |" for p in points]
  return "\n".join(rows)


def parse_list(text: str, kind=str) -> list:
  return [kind(t) for t in text.split(",") if t.strip()]


def main(argv: list[str]) -> list[dict]:
  p = common.add_train_step_flags(
      common.parser(__doc__.splitlines()[0], steps=6, warmup=1, rounds=3))
  p.add_argument("--models", default=",".join(common.TRAIN_STEP_MODELS),
                 help=f"comma-separated, of {', '.join(common.TRAIN_STEP_MODELS)}")
  p.add_argument("--batches", default="32,64,128,256,512", help="comma-separated batch sizes")
  args = p.parse_args(argv)
  models = parse_list(args.models)
  unknown = sorted(set(models) - set(common.TRAIN_STEP_MODELS))
  if unknown:
    p.error(f"unknown models {unknown}; choose from {list(common.TRAIN_STEP_MODELS)}")
  try:
    batches = parse_list(args.batches, int)
  except ValueError:
    p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
  if not batches or min(batches) < 1:
    p.error(f"--batches needs positive sizes, got {args.batches!r}")
  common.start_driver(args)
  points = []
  for model in models:
    for batch in batches:
      run_args = argparse.Namespace(**{**vars(args), "model": model, "batch": batch})
      records = common.run_interleaved([("benchmarks.train_step", n) for n in CASES], run_args)
      for record in records:
        print(json.dumps(record), flush=True)
      points.append(point(records))
      print(json.dumps(points[-1]), flush=True)
  print(table(points), file=sys.stderr)
  return points


if __name__ == "__main__":
  main(sys.argv[1:])

"""Writes a params-only checkpoint of a training workdir (what results/ commits).

  python scripts/export_params.py runs/cifar_standard results/cifar_standard.msgpack

The file holds the parameters and the run's config; `gfa_jax.load_model(FILE)` and
`eval.py --workdir FILE` read it like the workdir.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfa_jax import checkpoints  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="training workdir")
  parser.add_argument("output", help="the .msgpack file to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args()
  step = args.step if args.step is not None else checkpoints.latest_step(args.workdir)
  _, variables = checkpoints.load_model(args.workdir, step=step)
  metrics = Path(args.workdir) / "metrics.jsonl"
  evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "eval"]
  final = next((r for r in reversed(evals) if r["step"] == step), None)
  params, model_state = checkpoints.split_variables(variables)
  checkpoints.export_params(args.output, checkpoints.load_run_config(args.workdir), params,
                            {"step": step, "final_eval": final}, model_state=model_state)
  print(f"wrote {args.output} (step {step})")


if __name__ == "__main__":
  main()

"""The training loop's overhead: steps/s of ``train_lib.train_and_evaluate`` against its
compiled step called alone.

    python benchmarks/loop_overhead.py                            # this checkout
    python benchmarks/loop_overhead.py --repo ../gfa-jax-5353cb7  # another checkout's gfa_jax
    python benchmarks/loop_overhead.py --compute-dtype bfloat16   # the step in bfloat16

Runs as a script, not ``-m``, and imports ``gfa_jax`` and ``configs`` from ``--repo`` (default:
the checkout holding this file), so the same measurement points at any commit's loop, e.g. a
``git worktree add ../gfa-jax-5353cb7 5353cb7`` from before the loop stopped reading metrics
back at every step. It uses only what every version has: ``make_train_step``,
``make_optimizer``, ``TrainState`` and the ``seconds_per_step`` of ``metrics.jsonl``.

Per config (``--configs``: tiny = MLP on 256 images, batch 32; quickstart = SmallCNN GFA-DEEP on
the embedded 2,000 images, batch 128), each of ``--rounds`` rounds times, one after the other:

* ``step``: the step ``make_train_step`` compiles, called ``--steps`` times on batches already
  on the device, then ``block_until_ready``: the device's time per step and nothing else;
* ``loop``: ``train_and_evaluate`` for ``--steps`` steps (whole epochs: quickstart's 200 run
  210) in a fresh workdir, logging every ``--log-every`` steps (the same for every version),
  evaluating and saving only at the end;
  its speed is the median ``seconds_per_step`` of its log records after the first (which holds
  the compile), so start-up, the final evaluation and the checkpoint are not counted.

Prints one JSON line describing the machine and the ``gfa_jax`` measured, then one per config
with the median ms per step of each and ``loop_overhead`` = loop / step - 1 (0.05: the loop
runs 5% slower than its step alone). Timings are only meaningful on a quiet machine (the
machine line records the load average at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE_REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("tiny", "quickstart")


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repo", type=Path, default=HERE_REPO,
                 help="checkout whose gfa_jax and configs are measured (default: this one)")
  p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {CONFIGS}")
  p.add_argument("--steps", type=int, default=200, help="train steps per round of each")
  p.add_argument("--log-every", type=int, default=10, help="the loop's log_every_steps")
  p.add_argument("--rounds", type=int, default=3, help="rounds (step, then loop) per config")
  p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="config.compute_dtype (bfloat16 needs a checkout that has it)")
  p.add_argument("--plain-xla", action="store_true",
                 help="leave $XLA_FLAGS alone (default: the flags train.py sets, where the "
                      "measured checkout has gfa_jax.xla_flags)")
  args = p.parse_args(argv)
  args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  unknown = sorted(set(args.configs) - set(CONFIGS))
  if unknown:
    p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
  if args.steps < 2 * args.log_every or args.log_every < 1:
    p.error(f"--steps ({args.steps}) must be at least twice --log-every ({args.log_every}) >= 1: "
            "the first log interval holds the compile and is not counted")
  return args


def config_for(name: str, args: argparse.Namespace):
  """The config ``name`` cut to ``--steps`` steps, logging every ``--log-every``, evaluating
  (on 100 images) and saving only at the end; ``(config, number of training images)``."""
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  num_train = config.num_train or 2000  # quickstart: the embedded subset's 2,000 images.
  steps_per_epoch = num_train // config.batch_size
  config.num_epochs = math.ceil(args.steps / steps_per_epoch)
  total = config.num_epochs * steps_per_epoch
  config.log_every_steps = args.log_every
  config.eval_every_steps = 0
  config.checkpoint_every_steps = total
  config.num_eval_examples = config.num_train_eval_examples = config.eval_batch_size = 100
  if args.compute_dtype != "float32":
    from gfa_jax import train_lib

    if not hasattr(train_lib, "training_model"):  # It would train float32 without a word.
      raise SystemExit(f"error: the gfa_jax measured ({args.repo}) has no compute_dtype; "
                       "drop --compute-dtype or point --repo at a newer checkout")
    config.compute_dtype = args.compute_dtype
  return config, num_train


def time_step(config, num_train: int, steps: int) -> float:
  """Seconds per step of the compiled step alone, on 4 device-resident batches in turn."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from gfa_jax import data, models, train_lib

  dataset = data.load_dataset(config.data_source)
  images, labels = dataset.train_images[:num_train], dataset.train_labels[:num_train]
  mesh = train_lib.make_mesh()
  steps_per_epoch = num_train // config.batch_size
  model = (train_lib.training_model(config) if hasattr(train_lib, "training_model")
           else models.from_config(config.model))  # What the loop steps.
  params = models.init_params(model, jax.random.key(0), images.shape[1:])
  tx = train_lib.make_optimizer(config, steps_per_epoch)
  state = jax.device_put(train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx),
                         NamedSharding(mesh, PartitionSpec()))
  step = train_lib.make_train_step(config, model, mesh, steps_per_epoch)
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  batches = []
  for i in range(4):
    rows = data.train_batch_indices(num_train, config.batch_size, config.seed, i)
    batches.append(jax.device_put((images[rows], labels[rows]), batch_sharding))
  key = jax.random.key(0)
  state, metrics = step(state, *batches[0], key)  # Compile, outside the timing.
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, *batches[i % 4], key)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


def time_loop(config) -> list[float]:
  """Seconds per step of each log interval of a ``train_and_evaluate`` run but the first."""
  from gfa_jax import train_lib

  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
    train_lib.train_and_evaluate(config, workdir)
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [r["seconds_per_step"] for r in records if r["kind"] == "train"][1:]


def describe(repo: Path) -> dict:
  """The machine line: what was measured, where, at which load."""
  import gfa_jax
  import jax

  commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  return {"name": "machine", "gfa_jax": str(Path(gfa_jax.__file__).parent), "commit": commit,
          "device": str(jax.devices()[0]), "device_count": jax.device_count(),
          "nproc": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv: list[str]) -> None:
  args = parse(argv)
  sys.path.insert(0, str(args.repo.resolve()))  # Before anything imports gfa_jax or configs.
  if not args.plain_xla:
    try:  # Before JAX starts: XLA reads its flags once.
      from gfa_jax import xla_flags
      xla_flags.use_fast_cpu_convolutions()
    except ImportError:
      pass
  print(json.dumps(describe(args.repo)), flush=True)
  for name in args.configs:
    config, num_train = config_for(name, args)
    step_s, loop_s = [], []
    for _ in range(args.rounds):
      step_s.append(time_step(config, num_train, args.steps))
      loop_s += time_loop(config)
    step, loop = statistics.median(step_s), statistics.median(loop_s)
    print(json.dumps({
        "name": name, "model": config.model.name, "objective": config.objective,
        "compute_dtype": config.get("compute_dtype", "float32"),
        "batch": config.batch_size, "steps": args.steps, "log_every": args.log_every,
        "step_ms": round(1e3 * step, 3), "loop_ms": round(1e3 * loop, 3),
        "step_steps_per_s": round(1 / step, 2), "loop_steps_per_s": round(1 / loop, 2),
        "loop_overhead": round(loop / step - 1, 4),
        "step_ms_range": [round(1e3 * min(step_s), 3), round(1e3 * max(step_s), 3)],
        "loop_ms_range": [round(1e3 * min(loop_s), 3), round(1e3 * max(loop_s), 3)]}),
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

"""End-to-end training speed on CIFAR-10, input pipeline included, and the pipeline alone.

    python -m benchmarks.epoch --data-dir /work/data       # full CIFAR-10 (50,000 images)

A timed step is ``--block`` iterations of ``train_lib.train_and_evaluate``'s loop, each: the
batch's indices (``data.train_batch_indices``), the host gather from the in-memory uint8
arrays, the jitted step (which copies the batch to the device, augments it there and trains)
and the ``device_get`` of the metrics for the finite check. Seconds per epoch are the median
time per iteration times 50,000 // batch: an extrapolation from ``--steps x --block``
measured iterations, not a whole epoch. ``pipeline`` times the host side alone (indices,
gather, ``device_put``); ``epoch_gfa_deep_no_sync`` fetches the metrics once per block
instead of every iteration, so the host gathers the next batch while the step runs (async
dispatch). Together they show whether the input pipeline is ever the bottleneck.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from benchmarks import common

CIFAR10_TRAIN = 50_000
TRAIN_CASES = {"epoch_standard": ("standard", True), "epoch_gfa_deep": ("gfa", True),
               "epoch_gfa_deep_no_sync": ("gfa", False)}  # name -> (objective, sync each step)


def add_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--block", type=int, default=10, help="loop iterations per timed step")
  p.add_argument("--data-dir", default=os.environ.get("GFA_DATA_DIR", ""),
                 help="folder with CIFAR-10 (default $GFA_DATA_DIR; else the embedded subset)")
  return p


def _load(args):
  from gfa_jax import data

  dataset = data.load_dataset("cifar10" if args.data_dir else "embedded", args.data_dir or None)
  return dataset.train_images, dataset.train_labels, dataset.description


def build_pipeline(args: argparse.Namespace) -> common.Case:
  """Host side of one step: indices, gather, copy to the device (sharded like the step's)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from gfa_jax import data, train_lib

  images, labels, description = _load(args)
  sharding = NamedSharding(train_lib.make_mesh(), PartitionSpec("data"))
  counter = iter(range(10**9))

  def step():
    for _ in range(args.block):
      indices = data.train_batch_indices(len(images), args.batch, 0, next(counter))
      jax.block_until_ready(jax.device_put((images[indices], labels[indices]), sharding))

  return common.Case(step, args.block * args.batch, None,
                     {"framework": "jax", "images": description})


def build_loop(objective: str, sync: bool, args: argparse.Namespace) -> common.Case:
  """One iteration of the training loop, as train_lib.train_and_evaluate runs it."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from configs import default
  from gfa_jax import data, models, train_lib

  images, labels, description = _load(args)
  config = default.get_config()
  config.objective = objective
  config.batch_size = args.batch
  model = models.from_config(config.model)
  mesh = train_lib.make_mesh()
  params = models.init_params(model, jax.random.key(0), images.shape[1:])
  tx = train_lib.make_optimizer(config, data.steps_per_epoch(len(images), args.batch))
  state = jax.device_put(train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx),
                         NamedSharding(mesh, PartitionSpec()))
  train_step = train_lib.make_train_step(config, model, mesh)
  key = jax.random.key(config.seed)
  loop = {"state": state, "step": 0}

  def check(metrics):
    for m in jax.device_get(metrics):
      if not all(np.isfinite(m[k]) for k in train_lib.MUST_BE_FINITE):
        raise FloatingPointError(f"non-finite metrics before step {loop['step']}")

  def step():
    pending = []
    for _ in range(args.block):
      indices = data.train_batch_indices(len(images), args.batch, config.seed, loop["step"])
      loop["state"], metrics = train_step(loop["state"], images[indices], labels[indices], key)
      loop["step"] += 1
      pending.append(metrics)
      if sync:
        check(pending)
        pending = []
    check(pending)

  # A loop that retraced or recompiled (new shapes, dtypes, weak types) would show here.
  compiles = lambda: {"compiled_versions_of_step": train_step._cache_size()}
  return common.Case(step, args.block * args.batch, None,
                     {"framework": "jax", "images": description}, compiles)


CASES = {name: functools.partial(build_loop, *spec) for name, spec in TRAIN_CASES.items()}
CASES["pipeline"] = build_pipeline


def main(argv: list[str]) -> None:
  args = add_flags(common.parser(__doc__.splitlines()[0], steps=10, warmup=1, rounds=5)
                   ).parse_args(argv)
  results = common.main("benchmarks.epoch", CASES, args)
  if results:
    steps = CIFAR10_TRAIN // args.batch
    ms = {r["name"]: r["ms_per_step"] / args.block for r in results}  # per loop iteration
    out = {"name": "summary", "train_steps_per_cifar10_epoch": steps,
           **{f"{n}_ms_per_iteration": round(v, 3) for n, v in ms.items()},
           **{f"{n}_s_per_cifar10_epoch": round(v * steps / 1e3, 1) for n, v in ms.items()}}
    if "pipeline" in ms:
      out.update({f"pipeline_share_of_{n}": round(ms["pipeline"] / ms[n], 4)
                  for n in TRAIN_CASES if n in ms})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

"""Importing a RobustBench-size torch checkpoint, and one forward pass of it: wall time and
peak memory, one fresh process per arch.

For each arch, a first process writes a random checkpoint with the torch twin of the
architecture (tests/torch_archs.py, random BatchNorm statistics; not timed, and not in the
measuring process's memory); a second, fresh process then measures
``gfa_jax.load_torch_model`` (read + convert + put on the device; importing torch itself is
timed apart) and the forward pass of a
batch of ``--batch`` images: the first call (compilation + run) and the median of
``--repeats`` more. Peak memory is the process's resident high-water mark (VmHWM, else
``getrusage`` maxrss) after the imports, after loading and after the forwards (reset before
each phase where Linux allows, so each phase's peak is its own), plus the accelerator's peak
bytes where JAX reports them. One JSON line per arch.

  python -m benchmarks.import_forward                       # wrn-28-10, wrn-70-16, batch 64
  python -m benchmarks.import_forward --archs wrn-28-10 --width 1 --depth 10 --batch 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def _twin(arch: str, depth: int | None, width: int | None):
  """The torch module of ``arch`` (published depth and width unless overridden)."""
  from tests import torch_archs
  family, *size = arch.rsplit("-", 2) if arch.startswith(("wrn-", "dm-wrn-")) else (arch,)
  if size:
    depth, width = depth or int(size[0]), width or int(size[1])
  if family == "wrn":
    return torch_archs.WideResNet(depth, width)
  if family == "dm-wrn":
    return torch_archs.DMWideResNet(depth=depth, width=width)
  if family == "dm-preact-resnet18":
    return torch_archs.DMPreActResNet(width=width or 64)
  return torch_archs.ResNet18(preact=family == "preact_resnet18", width=width or 64)


def make_checkpoint(args: argparse.Namespace) -> None:
  """Writes ``args.path``: the random state_dict of ``args.arch``'s torch twin."""
  import torch
  from tests import torch_archs
  torch.manual_seed(0)
  net = torch_archs.randomised(_twin(args.arch, args.depth, args.width))
  torch.save(net.state_dict(), args.path)


def measure(args: argparse.Namespace) -> dict:
  """Loads ``args.path`` as ``args.arch`` and runs the forward pass; returns the record."""
  import jax
  import numpy as np

  import gfa_jax

  record = {"name": "import_forward", "arch": args.arch, "batch": args.batch,
            "depth": args.depth, "width": args.width, "device": str(jax.devices()[0]),
            "checkpoint_mb": round(Path(args.path).stat().st_size / 2**20, 1),
            "peak_rss_mb_after_imports": round(common.peak_rss_mb(), 1)}
  options = {k: v for k, v in (("depth", args.depth), ("width", args.width)) if v}
  start = time.perf_counter()
  import torch  # noqa: F401  (load_torch_model's lazy import, timed on its own)
  record["import_torch_module_s"] = round(time.perf_counter() - start, 3)
  common.reset_peak_rss()
  start = time.perf_counter()
  apply_fn, variables = gfa_jax.load_torch_model(args.path, args.arch, **options)
  jax.block_until_ready(variables)
  record["import_s"] = round(time.perf_counter() - start, 3)
  record["peak_rss_mb_import"] = round(common.peak_rss_mb(), 1)
  record["params"] = int(sum(a.size for a in jax.tree.leaves(variables["params"])))
  x = jax.device_put(np.random.RandomState(0).rand(args.batch, 32, 32, 3).astype(np.float32))
  forward = jax.jit(apply_fn)
  common.reset_peak_rss()
  start = time.perf_counter()
  forward(variables, x).block_until_ready()
  record["first_forward_s"] = round(time.perf_counter() - start, 3)  # compile + run
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    forward(variables, x).block_until_ready()
    times.append(time.perf_counter() - start)
  record["forward_s_median"] = round(statistics.median(times), 4)
  record["peak_rss_mb_forward"] = round(common.peak_rss_mb(), 1)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    record["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return record


def main(argv: list[str]) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", nargs="+", default=["wrn-28-10", "wrn-70-16"])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--depth", type=int, default=None, help="override (smoke runs)")
  parser.add_argument("--width", type=int, default=None, help="override (smoke runs)")
  parser.add_argument("--role", choices=["driver", "make", "measure"], default="driver")
  parser.add_argument("--arch", help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.role == "make":
    make_checkpoint(args)
    return []
  if args.role == "measure":
    record = measure(args)
    print(json.dumps(record), flush=True)
    return [record]
  from gfa_jax import xla_flags
  xla_flags.use_fast_cpu_convolutions()  # as eval.py does; the workers inherit $XLA_FLAGS
  print(json.dumps(common.machine(threads=len(common.usable_cores()))), flush=True)
  records = []
  sizes = [f"--{k}={v}" for k, v in (("depth", args.depth), ("width", args.width)) if v]
  with tempfile.TemporaryDirectory() as tmp:
    for arch in args.archs:
      path = str(Path(tmp) / f"{arch}.pt")
      base = [sys.executable, "-m", "benchmarks.import_forward", f"--arch={arch}",
              f"--path={path}", *sizes]
      subprocess.run([*base, "--role=make"], check=True, cwd=common.REPO)
      out = subprocess.run([*base, "--role=measure", f"--batch={args.batch}",
                            f"--repeats={args.repeats}"], check=True, cwd=common.REPO,
                           capture_output=True, text=True).stdout
      records.append(json.loads(out.strip().splitlines()[-1]))
      print(json.dumps(records[-1]), flush=True)
      Path(path).unlink()
  return records


if __name__ == "__main__":
  main(sys.argv[1:])

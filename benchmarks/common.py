"""Shared plumbing of the benchmarks: interleaved worker processes, timing, peak memory, FLOPs.

Every benchmark case (one train step, one attack, one matmul, in JAX or PyTorch) runs in its
own worker process, so its peak memory is its own. The driver starts the workers, lets each
set up (compile, warm up) one after the other, then runs them round-robin, a few timed steps
per worker per round, while the others wait idle. On a shared, noisy machine slow spells then
hit every case alike, cases never compete with each other for cores, and a ratio of two
medians from one run is meaningful even when the absolute numbers drift.

A case is a function ``build(args) -> Case``; ``Case.step()`` runs one step and returns only
when its results are computed (``block_until_ready``). Scripts call ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Multiply-adds per image of SmallCNN's forward pass (32x32x3 input, widths 32/64/128, 256).
CONV_MACS = (32 * 32 * 3 * 3 * 3 * 32, 16 * 16 * 3 * 3 * 32 * 64, 8 * 8 * 3 * 3 * 64 * 128)
DENSE_MACS = (2048 * 256, 256 * 10)
FORWARD_MACS = sum(CONV_MACS) + sum(DENSE_MACS)  # 10,848,768
FIRST_CONV_INPUT_GRAD_MACS = CONV_MACS[0]  # Skipped whenever the image needs no gradient.

# FLOPs (2 per multiply-add) per image, counting only convolutions and matmuls. A layer's
# backward pass costs two forwards (input gradient + weight gradient); its input gradient is
# dropped when nothing upstream needs it (the first conv's, unless the image is
# differentiated). GFA: forward F, first backward to the taps F (input gradients only, down to
# layer0), the second backward through that first backward 2F (each input-gradient op
# W^T g has a cotangent to g and to W), and the backward of the forward 2F - conv1.
FLOPS_PER_IMAGE = {
    "standard": 2 * (3 * FORWARD_MACS - FIRST_CONV_INPUT_GRAD_MACS),
    "gfa": 2 * (6 * FORWARD_MACS - FIRST_CONV_INPUT_GRAD_MACS),
    "forward": 2 * FORWARD_MACS,
    "input_gradient": 2 * 2 * FORWARD_MACS,  # forward + full backward to the image
}


def pgd_at_flops_per_image(steps: int, keep_best: bool = True) -> int:
  """PGD-AT: ``steps`` input gradients, the keep-best forward, then a standard step."""
  return (steps * FLOPS_PER_IMAGE["input_gradient"] + keep_best * FLOPS_PER_IMAGE["forward"]
          + FLOPS_PER_IMAGE["standard"])


@dataclasses.dataclass
class Case:
  """One benchmarked operation, built inside its worker.

  step: runs the operation once and blocks until its outputs exist.
  items_per_step: images processed by one step (0 for a matmul probe).
  flops_per_step: FLOPs one step does by our count (None: not counted).
  info: anything else worth reporting (XLA's FLOP count, compiled temp memory...).
  outcome: called after the last step, returns what it computed worth reporting (e.g. an
    attack's robust accuracy, to check that peers do the same work).
  """
  step: Callable[[], Any]
  items_per_step: int
  flops_per_step: float | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  outcome: Callable[[], dict[str, Any]] = dict


# ---------------------------------------------------------------------------------------------
# Memory. Linux keeps the peak resident set (VmHWM) per process; writing 5 to clear_refs resets
# it, so the peak of the timed steps excludes compilation (which can need more than a step).


def _status_mb(field: str) -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  return float("nan")


def reset_peak_rss() -> bool:
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:  # Not Linux, or not allowed: the peak then includes set-up.
    return False


def peak_rss_mb() -> float:
  peak = _status_mb("VmHWM")
  if math.isnan(peak):  # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
  return peak


def rss_mb() -> float:
  return _status_mb("VmRSS")


def usable_cores() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
      range(os.cpu_count() or 1))


def limit_cores(threads: int) -> None:
  """Runs this worker on its first ``threads`` cores (before JAX starts: XLA sizes its
  thread pool from the cores it may use; PyTorch is told with ``torch.set_num_threads``)."""
  cores = usable_cores()
  if threads < 1:
    raise ValueError(f"--threads must be >= 1, got {threads}")
  if threads < len(cores):
    if not hasattr(os, "sched_setaffinity"):
      raise ValueError("--threads below the core count needs Linux (sched_setaffinity)")
    os.sched_setaffinity(0, cores[:threads])


# ---------------------------------------------------------------------------------------------
# Worker side: reads one JSON command per line on stdin, answers one JSON line on stdout.


def serve(build: Callable[[argparse.Namespace], Case]) -> None:
  """The worker loop: ``setup`` (build with the driver's flags, warm up), ``run`` n timed
  steps, ``finish`` (report peak memory and exit)."""
  out = sys.stdout
  sys.stdout = sys.stderr  # Library chatter must not corrupt the protocol.
  case = None
  reset_ok = False
  rss_idle = float("nan")
  for line in sys.stdin:
    command = json.loads(line)
    if command["cmd"] == "setup":
      start = time.perf_counter()
      args = argparse.Namespace(**command["args"])
      limit_cores(args.threads)
      case = build(args)
      rss_idle = rss_mb()  # Model, data and compiled program exist; no step has run.
      for _ in range(args.warmup):
        case.step()
      reset_ok = reset_peak_rss()
      reply = {"setup_s": time.perf_counter() - start, "items_per_step": case.items_per_step,
               "flops_per_step": case.flops_per_step,
               "xla_flags": os.environ.get("XLA_FLAGS", ""), **case.info}
    elif command["cmd"] == "run":
      times, cpu_times = [], []
      for _ in range(command["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        case.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
      reply = {"seconds": times, "cpu_seconds": cpu_times}
    elif command["cmd"] == "finish":
      reply = {"peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": rss_idle,
               "peak_excludes_setup": reset_ok, "outcome": case.outcome()}
    else:
      raise ValueError(f"unknown worker command {command!r}")
    out.write(json.dumps(reply) + "\n")
    out.flush()
    if command["cmd"] == "finish":
      return


# Case variants, run as "<case>@<variant>" in a worker of their own next to "<case>" (same run,
# so the ratio of the two is meaningful): variant -> its worker's $XLA_FLAGS from the driver's.
# "ynnpack": convolutions left where XLA CPU puts them by default (YNNPACK, one thread per
# convolution) instead of the Eigen convolutions train.py and eval.py ask for
# (gfa_jax.xla_flags): the A/B that decides that flag, e.g. on one core (`--threads 1`).
VARIANTS = {
    "ynnpack": lambda flags: " ".join(f for f in flags.split()
                                      if "xla_cpu_experimental_ynn_fusion_type" not in f),
}


def split_variant(case: str) -> tuple[str, str]:
  """"apgd_ce@ynnpack" -> ("apgd_ce", "ynnpack"); a plain name -> (name, "")."""
  base, _, variant = case.partition("@")
  return base, variant


class _Worker:
  def __init__(self, module: str, case: str, env: dict[str, str]):
    self.name = case
    variant = split_variant(case)[1]
    if variant:
      env = {**env, "XLA_FLAGS": VARIANTS[variant](env.get("XLA_FLAGS", ""))}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", module, "--worker", case], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def ask(self, **command) -> dict:
    self.proc.stdin.write(json.dumps(command) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise RuntimeError(f"benchmark worker {self.name!r} died (exit code {code}); its "
                         "error is printed above")
    return json.loads(line)


def run_interleaved(specs: Sequence[tuple[str, str]], args: argparse.Namespace) -> list[dict]:
  """Runs ``(module, case)`` workers round-robin; returns one result dict per case.

  ``args.steps`` timed steps per case (at least one per round) over ``args.rounds`` rounds;
  each round starts at a different worker so no case always runs right after the same one.
  """
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
  rounds = max(1, min(args.rounds, args.steps))
  per_round = math.ceil(args.steps / rounds)
  workers = [_Worker(module, case, env) for module, case in specs]
  try:
    # One at a time, so compiles do not overlap; every worker gets the driver's flags.
    setups = [w.ask(cmd="setup", args=vars(args)) for w in workers]
    times = [{"seconds": [], "cpu_seconds": []} for _ in workers]
    for r in range(rounds):
      for k in range(len(workers)):
        i = (r + k) % len(workers)
        for key, values in workers[i].ask(cmd="run", steps=per_round).items():
          times[i][key] += values
    finals = [w.ask(cmd="finish") for w in workers]
  finally:
    for w in workers:
      w.proc.stdin.close()
      w.proc.wait()
  return [summarise(w.name, s, t["seconds"], f, t["cpu_seconds"])
          for w, s, t, f in zip(workers, setups, times, finals)]


def summarise(name: str, setup: dict, seconds: list[float], final: dict,
              cpu_seconds: list[float]) -> dict:
  """The JSON record of one case: median step time, throughput, FLOP rate, peak memory.

  ``cpu_ms_per_step`` is the process's CPU time per step (all threads): on a machine shared
  with other work it drifts less than wall time, and wall x threads - CPU shows idle waits.
  """
  median = statistics.median(seconds)
  record = {"name": name, "ms_per_step": round(1e3 * median, 3)}
  items = setup.pop("items_per_step")
  if items:
    record["images_per_s"] = round(items / median, 1)
  record["peak_rss_mb"] = round(final["peak_rss_mb"], 1)
  flops = setup.pop("flops_per_step")
  if flops:
    record["gflop_per_s"] = round(flops / median / 1e9, 2)
    record["gflop_per_step"] = round(flops / 1e9, 4)
  quartiles = (statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1
               else [median] * 3)
  record.update({
      "ms_p25": round(1e3 * quartiles[0], 3), "ms_p75": round(1e3 * quartiles[2], 3),
      "ms_min": round(1e3 * min(seconds), 3),
      "cpu_ms_per_step": round(1e3 * statistics.median(cpu_seconds), 3),
      "timed_steps": len(seconds),
      "rss_before_steps_mb": round(final["rss_before_steps_mb"], 1),
      "peak_excludes_setup": final["peak_excludes_setup"], **final["outcome"],
      **{k: v for k, v in setup.items() if k != "setup_s"},
      "setup_s": round(setup["setup_s"], 2)})
  return record


# ---------------------------------------------------------------------------------------------
# Command line shared by every script.


def parser(description: str, *, steps: int, warmup: int, rounds: int) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--steps", type=int, default=steps, help="timed steps per case (median)")
  p.add_argument("--warmup", type=int, default=warmup, help="untimed steps after compiling")
  p.add_argument("--rounds", type=int, default=rounds,
                 help="interleaving rounds; the timed steps are split evenly over them")
  p.add_argument("--cases", default="",
                 help="comma-separated subset of case names; NAME@ynnpack runs NAME with XLA "
                      "CPU's default (YNNPACK) convolutions instead of train.py's (Eigen)")
  p.add_argument("--threads", type=int, default=len(usable_cores()),
                 help="cores per worker, the same for JAX and PyTorch (default: all; fewer "
                      "pins the workers to the first ones)")
  p.add_argument("--plain-xla", action="store_true",
                 help="leave $XLA_FLAGS as it is (default: add the flags train.py and eval.py "
                      "set, gfa_jax.xla_flags, so the numbers are what users get)")
  p.add_argument("--torch-device", default="auto",
                 help="device of the PyTorch cases: cpu, cuda, cuda:1... (default auto: cuda "
                      "when PyTorch sees a GPU, else cpu); JAX uses its default device")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # Internal: run one case.
  return p


def torch_device(args: argparse.Namespace):
  """The ``torch.device`` of ``--torch-device`` ('auto': the GPU when PyTorch sees one), so
  the PyTorch side of a comparison runs where the JAX side does on a GPU machine."""
  import torch

  name = getattr(args, "torch_device", "auto")
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(name)
  if device.type == "cuda" and not torch.cuda.is_available():
    raise ValueError(f"--torch-device {name}: PyTorch sees no GPU; use cpu or auto")
  return device


def torch_synchronizer(device) -> Callable[[], None]:
  """What a PyTorch step calls last so that it returns only when its kernels have finished
  (CUDA launches are asynchronous; on the CPU there is nothing to wait for)."""
  import torch

  return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def select_cases(names: Sequence[str], wanted: str) -> list[str]:
  """The cases `wanted` names (comma-separated; all of `names` if empty), each a name of
  `names`, optionally with a variant of VARIANTS (``apgd_ce@ynnpack``)."""
  if not wanted:
    return list(names)
  chosen = [n.strip() for n in wanted.split(",") if n.strip()]
  unknown = [n for n in chosen if split_variant(n)[0] not in names
             or split_variant(n)[1] not in ("", *VARIANTS)]
  if unknown:
    raise ValueError(f"unknown cases {unknown}; choose from {list(names)}, each optionally "
                     f"with @variant, of {list(VARIANTS)}")
  return chosen


def variant_ratios(results: Sequence[dict]) -> dict[str, float]:
  """``{"<case>@<variant>_over_<case>": step-time ratio}`` for every variant timed beside its
  case in one run."""
  by = {r["name"]: r["ms_per_step"] for r in results}
  return {f"{name}_over_{split_variant(name)[0]}": round(ms / by[split_variant(name)[0]], 3)
          for name, ms in by.items() if split_variant(name)[1] and split_variant(name)[0] in by}


def _versions(*packages: str) -> dict[str, str]:
  found = {}
  for package in packages:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def machine(threads: int) -> dict:
  """What the numbers were measured on."""
  cpuinfo = Path("/proc/cpuinfo")
  lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
  model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")),
               platform.processor())
  return {"name": "machine", "cpu": model, "nproc": os.cpu_count(),
          "python": platform.python_version(), "threads": threads,
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "versions": _versions("jax", "jaxlib", "flax", "optax", "numpy", "torch"),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def start_driver(args: argparse.Namespace) -> None:
  """Sets the XLA flags train.py and eval.py set (unless ``--plain-xla``) before any worker
  starts, as they inherit $XLA_FLAGS, and prints the machine line."""
  if not args.plain_xla:
    from gfa_jax import xla_flags
    xla_flags.use_fast_cpu_convolutions()
  print(json.dumps(machine(args.threads)), flush=True)


def main(module: str, cases: dict[str, Callable[[argparse.Namespace], Case]],
         args: argparse.Namespace, extra_specs: Sequence[tuple[str, str]] = ()) -> list[dict]:
  """Worker mode runs one case; otherwise runs the selected cases (and ``extra_specs``,
  ``(module, case)`` pairs of other scripts, e.g. the PyTorch peer) interleaved and prints
  one JSON line per case after a line describing the machine."""
  if args.worker:  # A variant differs in its environment only (set by the driver).
    serve(cases[split_variant(args.worker)[0]])
    return []
  specs = [(module, n) for n in select_cases(list(cases), args.cases)] + list(extra_specs)
  start_driver(args)
  results = run_interleaved(specs, args)
  for record in results:
    print(json.dumps(record), flush=True)
  return results


# The PyTorch peer's train-step cases (benchmarks/torch_peer.py), which train_step.py --peer
# runs interleaved with its own; here so neither script imports the other.
TRAIN_STEP_MODELS = ("small_cnn", "resnet20", "resnet18")  # train_step.build_model's names
PEER_MODELS = ("small_cnn", "resnet18")  # and every wrn<depth>_<width>
TORCH_TRAIN_CASES = ("torch_standard", "torch_gfa_first", "torch_gfa_deep", "torch_gemm")


def wrn_size(name: str) -> tuple[int, int] | None:
  """``(depth, width)`` of a model name ``wrn<depth>_<width>`` (WRN-28-10: ``wrn28_10``), else
  None."""
  match = re.fullmatch(r"wrn(\d+)_(\d+)", name)
  return (int(match[1]), int(match[2])) if match else None


def train_step_model(name: str) -> str:
  """argparse type of ``--model``: a TRAIN_STEP_MODELS name or ``wrn<depth>_<width>``."""
  size = wrn_size(name)
  if name in TRAIN_STEP_MODELS or (size and (size[0] - 4) % 6 == 0 and size[0] > 4):
    return name
  raise argparse.ArgumentTypeError(
      f"unknown model {name!r}; choose one of {list(TRAIN_STEP_MODELS)} or wrn<depth>_<width> "
      "with depth = 6n + 4 (WRN-28-10: wrn28_10)")


def add_train_step_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The flags train_step.py and its PyTorch peer share (one definition, so both read them)."""
  p.add_argument("--batch", type=int, default=128, help="images per train step")
  p.add_argument("--model", default="small_cnn", type=train_step_model,
                 help=f"the model stepped: one of {', '.join(TRAIN_STEP_MODELS)} or a WideResNet "
                      f"wrn<depth>_<width> (wrn28_10); the PyTorch peer has "
                      f"{', '.join(PEER_MODELS)} and the WideResNets")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the step's convolutions and matmuls (parameters and "
                      "optimiser stay float32): JAX's config.compute_dtype, or a bfloat16 cast "
                      "for the BatchNorm models; PyTorch's autocast")
  p.add_argument("--gemm-size", type=int, default=2048, help="n of the n^3 matmul probe")
  p.add_argument("--peer", action="store_true",
                 help="also run the PyTorch peer's cases (needs the [bench] extra)")
  return p

"""Times the jitted SmallCNN train step: standard, GFA-FIRST, GFA-DEEP and PGD-AT.

    python -m benchmarks.train_step --batch 128            # JAX only
    python -m benchmarks.train_step --batch 128 --peer     # + the PyTorch peer and GEMM probes

The step is ``train_lib.make_train_step`` itself (on-device augmentation, Adam, donated state)
with ``configs/default.py`` overridden per case, fed one fixed device-resident uint8 batch (the
input pipeline is timed by ``benchmarks/epoch.py``). Prints one JSON line per case; with
``--peer`` also the PyTorch cases, both GEMM probes, and a ``summary`` line with the ratios
the issue's targets are stated in, all measured in the same interleaved run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys

import numpy as np

from benchmarks import common

TRAIN_CASES = {  # name -> configs/default.py overrides
    "standard": {"objective": "standard"},
    "gfa_first": {"objective": "gfa", "gfa_layers": ("layer0",)},
    "gfa_deep": {"objective": "gfa", "gfa_layers": ("layer0", "layer1", "layer2")},
    "pgd_at": {"objective": "pgd_at"},  # 7 PGD steps of 2/255 in the 8/255 ball (default).
}


def flops_per_image(config) -> int:
  if config.objective == "pgd_at":
    return common.pgd_at_flops_per_image(config.adversary.steps)
  return common.FLOPS_PER_IMAGE[config.objective]


def xla_cost(compiled) -> dict:
  """XLA's own FLOP count and buffer sizes of a compiled program (cross-checks ours)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = {"xla_gflop_per_step": round(float(cost.get("flops", 0.0)) / 1e9, 4)}
  memory = compiled.memory_analysis()
  if memory is not None:
    info["xla_temp_mb"] = round(memory.temp_size_in_bytes / 2**20, 1)
    info["xla_argument_mb"] = round(memory.argument_size_in_bytes / 2**20, 1)
  return info


class FixedStats:
  """A BatchNorm model's ``apply`` with its statistics held fixed (inference mode).

  ``train_lib``'s step calls ``model.apply({'params': ...}, x)``; the validation ResNet-18
  (``torch_import.TorchResNet18``) also needs its ``batch_stats``. They are closed over, so
  they are constants of the compiled step: a few thousand floats, and the benchmark never
  changes them. The convolutions, the taps and the FLOPs are those of the model as trained.
  """

  def __init__(self, module, batch_stats):
    self.module, self.batch_stats = module, batch_stats

  def apply(self, variables, *args, **kwargs):
    return self.module.apply({**variables, "batch_stats": self.batch_stats}, *args, **kwargs)


def build_model(name: str, config, key):
  """``(model, params)`` of a benchmark model: a ``models.MODELS`` name through the config,
  as train.py builds it, or ``resnet18``, the validation's ResNet-18 (``torch_import``,
  BatchNorm with fixed statistics, randomly initialised)."""
  from gfa_jax import data, models, torch_import

  shape = data.image_shape("cifar10")
  if name == "resnet18":
    module = torch_import.TorchResNet18()
    variables = module.init(key, np.zeros((1, *shape), np.float32))
    return FixedStats(module, variables["batch_stats"]), variables["params"]
  config.model.name = name
  model = models.from_config(config.model)
  return model, models.init_params(model, key, shape)


def build_train_case(overrides: dict, args: argparse.Namespace) -> common.Case:
  """``train_lib``'s compiled step (state donated) for configs/default.py + ``overrides``,
  on ``args.model``."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from configs import default
  from gfa_jax import train_lib

  config = default.get_config()
  config.update(overrides)
  config.batch_size = args.batch
  model, params = build_model(args.model, config, jax.random.key(0))
  mesh = train_lib.make_mesh()
  train_lib.check_divisible(args.batch, mesh)
  tx = train_lib.make_optimizer(config, steps_per_epoch=50_000 // args.batch)
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 10, (args.batch,), np.int32)
  key = jax.random.key(1)
  compiled = train_lib.make_train_step(config, model, mesh).lower(
      state, images, labels, key).compile()
  # The batch stays on the device: this times the step, not the host-to-device copy.
  _, image_sharding, label_sharding, _ = compiled.input_shardings[0]
  images, labels = jax.device_put(images, image_sharding), jax.device_put(labels, label_sharding)
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], images, labels, key)
    jax.block_until_ready((holder["state"], metrics))

  info = {"framework": "jax", "model": args.model, "batch": args.batch, **xla_cost(compiled)}
  # Our FLOP count is SmallCNN's; other models are rated by XLA's own count of the step.
  flops = (flops_per_image(config) * args.batch if args.model == "small_cnn"
           else info["xla_gflop_per_step"] * 1e9)
  return common.Case(step, args.batch, flops, info)


def build_gemm(args: argparse.Namespace) -> common.Case:
  """XLA's float32 matmul rate on an n x n x n product."""
  import jax
  import jax.numpy as jnp

  n = args.gemm_size
  a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(jnp.dot).lower(a, b).compile()
  return common.Case(lambda: matmul(a, b).block_until_ready(), 0, 2.0 * n**3,
                     {"framework": "jax"})


CASES = {name: functools.partial(build_train_case, o) for name, o in TRAIN_CASES.items()}
CASES["gemm"] = build_gemm


def summary(results: list[dict]) -> dict:
  """The ratios of the issue's targets, from records of one interleaved run."""
  by = {r["name"]: r for r in results}
  ms = lambda n: by[n]["ms_per_step"] if n in by else None
  ratio = lambda a, b: round(ms(a) / ms(b), 3) if ms(a) and ms(b) else None
  best_gemm = max((by[n]["gflop_per_s"] for n in ("gemm", "torch_gemm") if n in by),
                  default=None)
  out = {"name": "summary",
         "gfa_deep_jax_over_torch": ratio("gfa_deep", "torch_gfa_deep"),
         "standard_jax_over_torch": ratio("standard", "torch_standard"),
         "gfa_first_jax_over_torch": ratio("gfa_first", "torch_gfa_first"),
         "gfa_deep_over_standard_jax": ratio("gfa_deep", "standard"),
         "gfa_deep_over_standard_torch": ratio("torch_gfa_deep", "torch_standard"),
         "best_gemm_gflop_per_s": best_gemm}
  if best_gemm:
    for n in ("gfa_deep", "standard", "torch_gfa_deep", "torch_standard"):
      if n in by:
        out[f"{n}_fraction_of_gemm"] = round(by[n]["gflop_per_s"] / best_gemm, 3)
  # Memory of the step itself: peak RSS over the timed steps minus the RSS before the first.
  step_mb = lambda n: by[n]["peak_rss_mb"] - by[n]["rss_before_steps_mb"]
  for gfa, standard in (("gfa_deep", "standard"), ("torch_gfa_deep", "torch_standard")):
    if gfa in by and standard in by:
      out[f"{gfa}_over_{standard}_step_memory"] = round(
          step_mb(gfa) / max(step_mb(standard), 1e-9), 3)
  return out


def main(argv: list[str]) -> None:
  args = common.add_train_step_flags(common.parser(__doc__.splitlines()[0], steps=20, warmup=3, rounds=5)
                   ).parse_args(argv)
  extra = []
  if args.peer and args.model != "small_cnn":
    sys.exit(f"--peer has SmallCNN only (benchmarks/torch_peer.py); drop --peer for "
             f"--model {args.model}")
  if args.peer and not args.worker:
    if importlib.util.find_spec("torch") is None:
      sys.exit("--peer needs PyTorch: pip install -e '.[bench]' (CPU build: "
               "pip install 'torch==2.13.0+cpu')")
    extra = [("benchmarks.torch_peer", n) for n in common.TORCH_TRAIN_CASES]
  results = common.main("benchmarks.train_step", CASES, args, extra)
  if results and args.peer:
    print(json.dumps(summary(results)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

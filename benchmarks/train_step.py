"""Times the jitted train step (SmallCNN by default): standard, GFA-FIRST, GFA-DEEP and PGD-AT.

    python -m benchmarks.train_step --batch 128            # JAX only
    python -m benchmarks.train_step --batch 128 --peer     # + the PyTorch peer and GEMM probes
    python -m benchmarks.train_step --model wrn28_10 --dtype bfloat16 --peer \
        --cases standard,gfa_deep                          # WRN-28-10 in bfloat16, both sides

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


class Bfloat16Cast:
  """A model's ``apply`` computing in bfloat16: parameters, statistics and images cast on the
  way in, logits back to float32 on the way out (the parameters, their gradients and Adam stay
  float32). For the BatchNorm models, which have no ``dtype`` field (train_lib's
  ``compute_dtype`` covers small_cnn, mlp, resnet20, vit); unlike that field it also runs
  BatchNorm in bfloat16, as a whole-network cast does."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, x, *args, **kwargs):
    import jax
    import jax.numpy as jnp

    cast = lambda t: jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
    out = self.model.apply(cast(variables), cast(x), *args, **kwargs)
    return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, out)


def build_model(name: str, config, key):
  """``(model, params)`` of a benchmark model, computing in ``config.compute_dtype``: a
  ``models.MODELS`` name through the config, as train.py builds it (``training_model``), or a
  BatchNorm model with fixed statistics, randomly initialised: ``resnet18`` (the validation's
  ResNet-18, ``torch_import``) or ``wrn<depth>_<width>`` (RobustBench's WideResNet; WRN-28-10
  is ``wrn28_10``), cast to bfloat16 whole by ``Bfloat16Cast`` when asked."""
  from gfa_jax import data, models, torch_import, train_lib

  shape = data.image_shape("cifar10")
  size = common.wrn_size(name)
  if name == "resnet18" or size:
    module = torch_import.TorchResNet18() if name == "resnet18" else models.WideResNet(*size)
    variables = jax_init(module, key, shape)
    model = FixedStats(module, variables["batch_stats"])
    if config.get("compute_dtype", "float32") == "bfloat16":
      model = Bfloat16Cast(model)
    return model, variables["params"]
  config.model.name = name
  model = train_lib.training_model(config)
  return model, models.init_params(models.from_config(config.model), key, shape)


def jax_init(module, key, shape):
  """``module``'s variables for one image of ``shape``, initialised in one compiled program
  (op by op, a WRN-28-10's init dispatches hundreds of small computations)."""
  import jax
  import jax.numpy as jnp

  return jax.jit(lambda k: module.init(k, jnp.zeros((1, *shape), jnp.float32)))(key)


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
  config.compute_dtype = getattr(args, "dtype", "float32")
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

  info = {"framework": "jax", "model": args.model, "batch": args.batch,
          "dtype": config.compute_dtype, "device": str(jax.devices()[0].device_kind),
          **xla_cost(compiled)}
  # Our FLOP count is SmallCNN's; other models are rated by XLA's own count of the step.
  flops = (flops_per_image(config) * args.batch if args.model == "small_cnn"
           else info["xla_gflop_per_step"] * 1e9)
  return common.Case(step, args.batch, flops, info, device_memory)


def device_memory() -> dict:
  """Peak memory of the default device (GPU, TPU) since the worker started, compilation and
  set-up included: ``{}`` where the backend keeps no statistics (CPU; see peak_rss_mb)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {"device_peak_mb": round(peak / 2**20, 1)} if peak else {}


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
  if args.peer and args.model not in common.PEER_MODELS and not common.wrn_size(args.model):
    sys.exit(f"error: the PyTorch peer has {', '.join(common.PEER_MODELS)} and the WideResNets "
             f"(benchmarks/torch_peer.py); drop --peer for --model {args.model}")
  if args.peer and not args.worker:
    if importlib.util.find_spec("torch") is None:
      sys.exit("--peer needs PyTorch: pip install -e '.[bench]' (CPU build: "
               "pip install 'torch==2.13.0+cpu')")
    # The peer's twins of the cases chosen (all of them by default).
    chosen = {common.split_variant(n)[0] for n in common.select_cases(list(CASES), args.cases)}
    extra = [("benchmarks.torch_peer", n) for n in common.TORCH_TRAIN_CASES
             if n.removeprefix("torch_") in chosen]
  results = common.main("benchmarks.train_step", CASES, args, extra)
  if results and args.peer:
    print(json.dumps({**summary(results), "model": args.model, "dtype": args.dtype}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

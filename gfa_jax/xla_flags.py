"""Process-level XLA settings for the command lines (train.py, eval.py, scripts/)."""

import os

# XLA CPU hands convolutions to YNNPACK, which runs each on one thread; leaving YNNPACK only
# the dots gives convolutions to Eigen, which uses every core: train steps about 26 % shorter
# on a 2-core CPU (benchmarks/README.md). Not "dot,eltwise,reduce", which was as fast: with
# elementwise ops in YNNPACK, CW-L2 (tanh-space Adam) returned perturbations 35x too large on
# a standard SmallCNN (median L2 7.3 instead of 0.21), while train-step gradients agreed to
# 1e-7. GPU/TPU ignore the flag.
FAST_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=dot"


def use_fast_cpu_convolutions() -> None:
  """Adds FAST_CPU_CONVOLUTIONS to $XLA_FLAGS unless the user already set that flag.

  XLA reads $XLA_FLAGS when the first computation starts a backend, so call this before any
  JAX computation (importing jax is fine).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_CONVOLUTIONS}".strip()

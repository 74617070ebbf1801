"""Process-level XLA settings for the command lines (train.py, eval.py, scripts/)."""

import os

# XLA CPU hands convolutions to YNNPACK, which runs each on one thread; leaving YNNPACK only
# dots, elementwise ops and reductions gives convolutions to Eigen, which uses every core:
# train steps 26-29 % shorter on a 2-core CPU (benchmarks/README.md). GPU/TPU ignore it.
FAST_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


def use_fast_cpu_convolutions() -> None:
  """Adds FAST_CPU_CONVOLUTIONS to $XLA_FLAGS unless the user already set that flag.

  XLA reads $XLA_FLAGS when the first computation starts a backend, so call this before any
  JAX computation (importing jax is fine).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_CONVOLUTIONS}".strip()

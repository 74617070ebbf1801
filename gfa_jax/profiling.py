"""Compilation time spent so far by this thread, from JAX's own monitoring events.

Why: an attack's wall time includes compiling its programs (once per model, attack and batch
shape), which the reference in eager PyTorch never pays. AutoAttack records both per stage, so
a user (and benchmarks/README.md) can tell compilation from arithmetic: take `compiled()`
before and after a block and subtract.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import jax

# Lowering to StableHLO and XLA's compilation of it: each happens once per compiled program and
# never nests. Tracing (`jaxpr_trace_duration`) is left out: a jit traced inside another one
# records its own event inside the outer one's, so summing it would count time twice.
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
XLA_COMPILE = "/jax/core/compile/backend_compile_duration"


class Compiled(NamedTuple):
  """Seconds spent lowering and compiling, and how many programs XLA compiled (a program
  loaded from the persistent compilation cache is not one)."""
  seconds: float = 0.0
  programs: int = 0

  def __sub__(self, other: Compiled) -> Compiled:
    return Compiled(self.seconds - other.seconds, self.programs - other.programs)


_totals = threading.local()  # per thread, so a benchmark's other threads do not leak in


def _listen(event: str, duration: float, **_) -> None:
  if event in (LOWER, XLA_COMPILE):
    total = compiled()
    _totals.value = Compiled(total.seconds + duration, total.programs + (event == XLA_COMPILE))


jax.monitoring.register_event_duration_secs_listener(_listen)  # once, when first imported


def compiled() -> Compiled:
  """What this thread has compiled since this module was imported."""
  return getattr(_totals, "value", Compiled())

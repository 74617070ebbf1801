"""profiling.compiled: the compile time AutoAttack reports beside each stage's wall time."""

import threading

import jax
import jax.numpy as jnp

from gfa_jax import profiling


def test_compiled_counts_each_new_program_once_and_only_this_threads():
  f = jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)
  x = jnp.arange(7.0)  # made before, so its own small programs are not counted below
  before = profiling.compiled()
  f(x).block_until_ready()
  first = profiling.compiled() - before
  assert first.programs == 1 and first.seconds > 0, first
  again = profiling.compiled()
  f(x).block_until_ready()  # same shape: jit's cache, nothing compiles
  assert profiling.compiled() - again == profiling.Compiled()

  other = profiling.compiled()
  thread = threading.Thread(target=lambda: f(jnp.arange(9.0)).block_until_ready())
  thread.start()
  thread.join()
  assert profiling.compiled() - other == profiling.Compiled()  # another thread's compile

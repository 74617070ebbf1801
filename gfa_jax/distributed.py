"""Multi-process runs: starting JAX's distributed runtime, and which process writes.

A run on several hosts (or several processes on one) is one program started N times. Each
process owns its local devices; `jax.devices()` then lists every process's, the training mesh
spans them all, and XLA's collectives (gloo on CPU, NCCL on GPU) carry the gradient all-reduce.
Every process computes; only process 0 (`is_primary`) takes the workdir lock and writes the
config, metrics, results and the log; Orbax's checkpoints are written by all processes
together (Orbax coordinates them). Launch lines are in README.md ("Several processes").

How a process learns it is one of several, in order:
- `--num_processes N --process_id I --coordinator_address HOST:PORT` (train.py / eval.py);
- the environment: `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_COORDINATOR_ADDRESS` (JAX
  itself reads the last one only); for `ssh` loops and torchrun-style launchers;
- SLURM (`srun` with more than one task) and Open MPI (`mpirun -n N`), which JAX detects.
"""

from __future__ import annotations

import os

import jax

ENV = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer; set it to one") from None


def _detected_cluster() -> bool:
  """True under `srun` with several tasks or `mpirun -n N>1` (JAX reads the rest itself)."""
  slurm = os.environ.get("SLURM_STEP_ID") is not None and _int_env("SLURM_NTASKS") not in (None, 1)
  ompi = _int_env("OMPI_COMM_WORLD_SIZE") not in (None, 1)
  return slurm or ompi


def initialize(num_processes: int | None = None, process_id: int | None = None,
               coordinator_address: str | None = None) -> bool:
  """Starts JAX's distributed runtime if this process is one of several; returns whether it
  did. Must run before the first computation. Raises ValueError, naming what is missing, for
  an incomplete or inconsistent description (half a launch line must not train alone)."""
  num_processes = num_processes if num_processes is not None else _int_env(ENV[0])
  process_id = process_id if process_id is not None else _int_env(ENV[1])
  coordinator_address = coordinator_address or os.environ.get(ENV[2]) or None
  if num_processes is None and process_id is None and coordinator_address is None:
    if _detected_cluster():
      jax.distributed.initialize()
      return True
    return False
  if num_processes is None or num_processes < 1:
    raise ValueError(f"num_processes is {num_processes}; pass --num_processes N (N >= 1) or "
                     f"set ${ENV[0]}")
  if num_processes == 1:
    return False
  missing = [name for name, value in (("process_id", process_id),
                                      ("coordinator_address", coordinator_address))
             if value is None]
  if missing:
    raise ValueError(f"{num_processes} processes but no {' or '.join(missing)}; pass "
                     f"--{' --'.join(missing)} (or set ${ENV[1]} / ${ENV[2]}) on every process")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes}); number the "
                     "processes 0 to N - 1")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; always true with one process)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process gets here (a no-op with one process); `name` labels the
  barrier in errors."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)

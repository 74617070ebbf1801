"""Host-side batching shared by every evaluator: fixed-shape batches, padding, shape buckets.

Everything that runs a model over more images than fit in one call (attacks, predictions, the
checklist's probes, the analyses, training's periodic evaluation) goes through `map_batches`:

- batches have one padded shape (the last batch repeats its last row, padded rows are
  dropped from the outputs), so a jitted function compiles once per shape, not once more for
  the remainder;
- with `bucket=True` full batches, then the remainder padded up to the next bucket size (four
  per doubling: 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), so calls on varying numbers of
  rows (AutoAttack's shrinking robust sets) reuse at most 4 log2(batch_size) compiled shapes
  while padding at most a quarter of the last batch;
- batch i gets the key `fold_in(key, i)`, so results are a pure function of (key, batch size);
- with several local devices (GPUs, or `--xla_force_host_platform_device_count=N` CPUs) each
  batch is split over them along its first axis (a one-axis `Mesh`; the model's variables are
  replicated by jit), padded to a multiple of the device count. JAX's random numbers do not
  depend on the sharding, so the masks are those of one device (tests/test_batching.py).

Models are passed as `bind(apply_fn, variables)`: a `jax.tree_util.Partial` whose leaves (the
weights) are traced arguments of the jitted functions, never constants baked into them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def bind(apply_fn: Callable, variables) -> jax.tree_util.Partial:
  """``logits_fn(x) = apply_fn(variables, x)`` with the variables as a traced argument.

  Attacks and predictions are compiled per function *and* per value of whatever a static
  function closes over: a ``functools.partial(apply_fn, variables)`` compiles again for every
  model and keeps each model's weights alive in the jit cache. A ``jax.tree_util.Partial`` is
  a pytree whose leaves (the weights) are traced, so a second model of the same architecture
  (the same ``apply_fn``, e.g. ``models.from_config`` of an equal config) reuses every
  compiled attack.
  """
  return jax.tree_util.Partial(apply_fn, variables)


def as_pytree(logits_fn: Callable) -> jax.tree_util.Partial:
  """Any callable as a pytree argument of a jitted function: a `bind`-made Partial as it is
  (its weights traced), any other function as a leafless Partial (static, as before)."""
  if isinstance(logits_fn, jax.tree_util.Partial):
    return logits_fn
  return jax.tree_util.Partial(logits_fn)


def batches(n: int, batch_size: int, bucket: bool = False) -> list[tuple[int, int, int]]:
  """(start, stop, padded size) of each batch over n rows.

  Without `bucket` every batch is padded to the same size, min(batch_size, n) (one compile).
  With `bucket`, full batches of batch_size, then the remainder padded up to `bucket_size`
  (280 points at batch 250 are 250 + 32 rows, not 2 x 250; 45 are 48, not 64: an attack's
  cost is its padded rows, and a power of two wasted up to half of them).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if n == 0:
    return []
  size = min(batch_size, n)
  if not bucket:
    return [(start, min(start + size, n), size) for start in range(0, n, size)]
  out = [(start, start + batch_size, batch_size)
         for start in range(0, n - batch_size + 1, batch_size)]
  rest = n - len(out) * batch_size
  if rest:
    out.append((n - rest, n, min(batch_size, bucket_size(rest))))
  return out


def bucket_size(n: int) -> int:
  """n rounded up to the next of 1, ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...: the
  sizes m * 2**k with m in 4..7, at most 25 % padding for four compiled shapes a doubling."""
  if n <= 8:
    return n
  step = 1 << ((n - 1).bit_length() - 3)
  return -(-n // step) * step


def data_parallel_sharding() -> NamedSharding | None:
  """Batch-first sharding over every local device, or None with one device (the arrays then
  stay where jit puts them: nothing changes on one CPU)."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  return NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))


def put(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """``a`` (the same value on every process) placed with `sharding`. With several processes
  each one transfers only the part its own devices hold (``jax.device_put`` cannot place a
  host array on another process's devices)."""
  if sharding.is_fully_addressable:
    return jax.device_put(a, sharding)
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def put_rows(source: np.ndarray, rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """``source[rows]`` placed with `sharding` (batch first); with several processes each one
  gathers only the rows of its own devices: a training step's batch is read per process."""
  if sharding.is_fully_addressable:
    return jax.device_put(source[rows], sharding)
  shape = (len(rows),) + source.shape[1:]
  return jax.make_array_from_callback(
      shape, sharding, lambda index: source[rows[index[0]]][(slice(None),) + index[1:]])


def fetch(tree: Any) -> Any:
  """A numpy copy of a pytree of arrays, the whole value on every process: arrays sharded
  over several processes are gathered (a collective: every process must call it)."""
  def one(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
      return np.asarray(jax.device_get(a))
    if a.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return jax.tree.map(one, tree)


def num_batches(n: int, batch_size: int) -> int:
  """How many batches `map_batches` runs over n rows without buckets (progress bars)."""
  return len(batches(n, batch_size))


def pad(a: np.ndarray, size: int) -> np.ndarray:
  """Pads the first axis to `size` by repeating the last row (padded rows are discarded)."""
  missing = size - a.shape[0]
  return a if missing == 0 else np.concatenate([a, np.repeat(a[-1:], missing, axis=0)])


def map_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, *,
                key: jax.Array | None = None, bucket: bool = False,
                progress: Any = None, sharding: NamedSharding | None = None) -> Any:
  """``fn(*batch[, key_i])`` over padded batches of `arrays` (equal first axes), concatenated.

  Returns the outputs (a pytree of batch-first arrays) as numpy, padded rows removed. With
  `key`, batch i is called with ``fold_in(key, i)`` as its last argument. `progress`, a tqdm
  bar, advances by one per batch. `sharding` places each batch (default:
  `data_parallel_sharding()`; training passes its own mesh's). An empty input calls nothing
  and returns None.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"map_batches needs arrays of one length, got {[len(a) for a in arrays]}.")
  sharding = sharding or data_parallel_sharding()
  devices = 1 if sharding is None else sharding.mesh.devices.size
  outs = []
  for i, (start, stop, size) in enumerate(batches(n, batch_size, bucket)):
    size = -(-size // devices) * devices  # every device gets the same number of rows
    args = [pad(a[start:stop], size) for a in arrays]
    if sharding is not None:
      args = [put(a, sharding) for a in args]
    if key is not None:
      args.append(jax.random.fold_in(key, i))
    out = fetch(fn(*args))
    outs.append(jax.tree.map(lambda o, k=stop - start: np.asarray(o)[:k], out))
    if progress is not None:
      progress.update(1)
  if not outs:
    return None
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


@jax.jit
def _predict_batch(x, logits_fn):
  return jnp.argmax(logits_fn(x), axis=-1)


def predict(logits_fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes [N] (numpy int) of images x [N, H, W, C], in jit-compiled batches."""
  x = np.asarray(x, np.float32)
  model = as_pytree(logits_fn)
  out = map_batches(lambda xb: _predict_batch(xb, model), [x], batch_size, bucket=True)
  return np.zeros((0,), np.int32) if out is None else out

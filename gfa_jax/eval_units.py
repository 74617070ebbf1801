"""Long evaluations as units: resumable after a crash, split over several processes.

A long evaluation (AutoAttack on 10,000 CIFAR-10 images is GPU-hours) is a sequence of units,
one per batch of every attack call: (scope, call, batch), the scope naming the attack, the eps
and, inside AutoAttack, the stage. While `recording(store)` is active,
`core.run_in_batches` stores each finished batch's adversarial examples in the store's progress
folder (one small .npz per unit, written atomically), and loads the units it finds there
instead of computing them. Every batch's result is a pure function of its inputs and its key
(``fold_in(key, batch index)``, see `batching`), and the inputs of later units (AutoAttack's
robust set after each stage) are computed from the restored units exactly as from computed
ones, so a resumed evaluation returns what an uninterrupted one returns
(tests/test_resume_eval.py).

With several processes (`jax.process_count() > 1`) on one shared progress folder, process p
computes the batches i with i % P == p of every call and reads the others' units from the
folder as they appear; each process then holds every result, as one process would.

The folder's manifest records the request (model and data fingerprints, attack, eps, ...): a
different request on the same folder is refused, naming the fields that differ.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gfa_jax import batching

MANIFEST = "manifest.json"
VERSION = 1


def fingerprint(*trees: Any) -> str:
  """sha256 (hex, first 16 digits) of the leaves of pytrees: their dtypes, shapes and bytes.

  Exists to tell one model's weights (the leaves of a `batching.bind` logits function) or one
  data set from another in a manifest without storing them."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(trees):
    if callable(leaf):
      digest.update(getattr(leaf, "__qualname__", type(leaf).__name__).encode())
      continue
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def model_fingerprint(logits_fn: Callable) -> str:
  """`fingerprint` of a logits function: its function's name and, for a `batching.bind` model,
  its weights (a closure's captured weights are not seen: name the checkpoint in the request)."""
  model = batching.as_pytree(logits_fn)
  return fingerprint(getattr(model.func, "__qualname__", repr(model.func)), model)


class UnitStore:
  """A progress folder: `MANIFEST` (the request) and one ``<unit>.npz`` per finished unit.

  Raises ValueError if the folder holds the progress of a different request (the message names
  the differing fields and the fix).
  """

  def __init__(self, folder: str | Path, request: dict[str, Any]):
    self.folder = Path(folder)
    # Through JSON, so that tuples and lists, ints and floats compare as they are stored.
    manifest = json.loads(json.dumps({"unit_store_version": VERSION, **request}, default=str))
    path = self.folder / MANIFEST
    stored = json.loads(path.read_text()) if path.exists() else None
    # A folder without any finished unit (a run that failed before its first batch) holds
    # nothing to lose: a corrected request takes it over.
    if stored not in (None, manifest) and any(self.folder.glob("*.npz")):
      differ = sorted(k for k in stored.keys() | manifest.keys()
                      if stored.get(k) != manifest.get(k))
      raise ValueError(f"{self.folder} holds the progress of another evaluation (it differs "
                       f"in {', '.join(differ)}); pass another --output, or delete "
                       f"{self.folder} to start this one from zero")
    if stored != manifest:  # Several processes may write it at once: the same bytes, atomically.
      from gfa_jax import reporting  # here: it loads matplotlib, which attacks never need
      reporting.write_json(path, manifest, indent=1)
    self.process, self.processes = jax.process_index(), jax.process_count()
    self._calls: dict[tuple[str, ...], int] = {}

  def path(self, name: str) -> Path:
    return self.folder / f"{name}.npz"

  def load(self, name: str) -> np.ndarray | None:
    """The stored output of unit `name`, or None if it has not finished."""
    try:
      with np.load(self.path(name)) as stored:
        return stored["out"]
    except FileNotFoundError:
      return None

  def save(self, name: str, out: np.ndarray) -> None:
    """Stores unit `name` (temporary file + rename: a kill leaves it whole or absent)."""
    from gfa_jax import reporting
    with io.BytesIO() as archive:
      np.savez(archive, out=np.asarray(out), process=self.process)  # who computed it
      reporting.write_atomically(self.path(name), archive.getvalue())

  def wait(self, name: str, poll_seconds: float = 0.05) -> np.ndarray:
    """The output of unit `name`, waiting until another process has stored it."""
    while (out := self.load(name)) is None:
      time.sleep(poll_seconds)
    return out

  def owns(self, index: int) -> bool:
    """Whether this process computes batch `index` of a call (round robin over processes)."""
    return index % self.processes == self.process

  def next_call(self, scope: tuple[str, ...]) -> str:
    """A unit prefix for the next call in `scope`: calls are numbered in the order they run,
    which the evaluation fixes (no call depends on timing)."""
    count = self._calls.get(scope, 0)
    self._calls[scope] = count + 1
    return ".".join((*scope, f"call{count}"))


_ACTIVE: contextvars.ContextVar[tuple[UnitStore, tuple[str, ...]] | None] = (
    contextvars.ContextVar("gfa_jax_eval_units", default=None))


@contextlib.contextmanager
def recording(store: UnitStore | None) -> Iterator[None]:
  """Within the block, attack calls store and reuse their units in `store` (None: nothing is
  stored, every unit is computed)."""
  token = _ACTIVE.set(None if store is None else (store, ()))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
  """Names the units of the calls within the block (attack, eps, stage); a no-op
  outside `recording`."""
  active = _ACTIVE.get()
  if active is None:
    yield
    return
  token = _ACTIVE.set((active[0], (*active[1], str(name))))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


class BatchUnits:
  """The units of one `map_batches` call over n rows: `wrap` the per-batch function, then
  `complete` its output (the batches computed by other processes)."""

  def __init__(self, store: UnitStore, prefix: str, bounds: list[tuple[int, int, int]]):
    self.store, self.prefix, self.bounds = store, prefix, bounds
    self._next = 0

  def name(self, index: int) -> str:
    return f"{self.prefix}.b{index:06d}"

  def wrap(self, fn: Callable) -> Callable:
    """`fn(x_batch, ...)` that loads a finished batch, stores a computed one, and leaves the
    batches of other processes as zeros (filled by `complete`). Batches are counted in the
    order `map_batches` calls them (0, 1, ...)."""
    def run(*args):
      index = self._next
      self._next += 1
      done = self.store.load(self.name(index))
      if done is not None:
        return done
      if not self.store.owns(index):
        return np.zeros(args[0].shape, np.float32)
      out = batching.fetch(fn(*args))
      self.store.save(self.name(index), out)
      return out
    return run

  def complete(self, out: np.ndarray) -> np.ndarray:
    """`out` with the rows of other processes' batches read from the store (waiting for them)."""
    for index, (start, stop, _) in enumerate(self.bounds):
      if not self.store.owns(index):
        out[start:stop] = self.store.wait(self.name(index))[:stop - start]
    return out


def batch_units(n: int, batch_size: int, bucket: bool) -> BatchUnits | None:
  """The units of the next attack call over n rows in the active scope; None outside
  `recording` or with no rows (the call then runs as it always did)."""
  active = _ACTIVE.get()
  if active is None or not n:
    return None
  store, names = active
  return BatchUnits(store, store.next_call(names), batching.batches(n, batch_size, bucket))

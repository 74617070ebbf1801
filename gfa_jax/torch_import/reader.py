"""The part of torch import every family shares: reading a checkpoint file into named float32
arrays (its container, its key prefixes), and putting those arrays into a Flax model's
variables, refusing a missing, unexpected or mis-shaped key in one line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The dicts checkpoints wrap their state_dict in (training scripts, RobustBench's {"last": ...}).
CONTAINERS = ("state_dict", "model_state_dict", "model", "net", "last")
# Key prefixes of wrappers: DataParallel's "module.", a normalising wrapper's "model.".
PREFIXES = ("module.", "model.")


def _first_line(error: BaseException) -> str:
  """The first line of ``error``'s message (at most 200 characters), or its type's name when
  the message is empty (torch's EOFError on an empty file has none)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
  """``state`` without a wrapper's prefix that EVERY key carries (repeatedly: 'module.model.')."""
  state = dict(state)
  while state:
    prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
    if prefix is None:
      break
    state = {k.removeprefix(prefix): v for k, v in state.items()}
  return state


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """The tensors of a torch checkpoint file as float32 numpy arrays, keyed by name.

  Exists so every family reads files the same way: a bare state_dict or one wrapped in
  ``{'state_dict' | 'model_state_dict' | 'model' | 'net' | 'last': ...}``, keys with
  ``module.`` / ``model.`` prefixes (stripped when every key has one); ``num_batches_tracked``
  counters are dropped. Only tensors are read (``weights_only=True``): no code is unpickled.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError("load_torch_model needs PyTorch: pip install -e '.[crosscheck]' "
                      "(or any torch build).") from e
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file; pass the path of a torch state_dict "
                            "(.pt/.pth) file.")
  if path.stat().st_size == 0:
    raise ValueError(f"{path}: the file is empty (0 bytes); pass a torch state_dict (.pt/.pth) "
                     "file saved with torch.save.")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a file it cannot read safely
    raise ValueError(f"{path}: not a torch state_dict file that loads with weights_only=True "
                     f"({_first_line(e)}).") from e
  for container in CONTAINERS:
    if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
      state = state[container]
  if (not isinstance(state, Mapping) or not state
      or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in state.items())):
    raise ValueError(f"{path}: expected a mapping of tensor names to tensors (a state_dict), "
                     f"got {type(state).__name__}{' (empty)' if not state else ''}.")
  return {key: value.detach().cpu().float().numpy()
          for key, value in _strip_prefixes(state).items()
          if not key.endswith("num_batches_tracked")}


def torch_key(path: tuple[str, ...]) -> str:
  """The torch tensor name of a Flax variable path: the models name their modules after
  torch's module paths with "." written "__", e.g. ('params', 'block1__layer__0', 'conv1',
  'kernel') -> 'block1.layer.0.conv1.weight'."""
  collection, *modules, leaf = path
  name = ".".join(m.replace("__", ".") for m in modules)
  if collection == "batch_stats":
    return f"{name}.running_{'mean' if leaf == 'mean' else 'var'}"
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def to_flax(tensor: np.ndarray) -> np.ndarray:
  """A torch tensor in Flax's layout: conv [out, in, kh, kw] -> HWIO, linear [out, in] ->
  [in, out], vectors as they are."""
  if tensor.ndim == 4:
    return tensor.transpose(2, 3, 1, 0)
  return tensor.T if tensor.ndim == 2 else tensor


def _shown(names: list[str]) -> str:
  return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def assign(model: nn.Module, state: Mapping[str, np.ndarray], arch: str, archs: Iterable[str],
           ignore: tuple[str, ...] = (), image_shape: tuple[int, int, int] = (32, 32, 3),
           ) -> dict[str, Any]:
  """``model``'s ``{'params', 'batch_stats'}`` holding the tensors of ``state``.

  Exists so a checkpoint of another architecture (or width, or class count) fails at once
  instead of giving wrong logits: raises ValueError, on one line, naming the missing,
  unexpected and mis-shaped keys (keys starting with a prefix in ``ignore`` are skipped, e.g.
  the unused ``sub_block1.`` of some WideResNet checkpoints). ``archs`` are named in the hint.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
  # The weights only: init also makes the taps' collections (zero perturbations, sown inputs).
  abstract = {k: abstract[k] for k in ("params", "batch_stats") if k in abstract}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values, missing, misshaped, used = [], [], [], set()
  for key_path, leaf in leaves:
    name = torch_key(tuple(k.key for k in key_path))
    if name not in state:
      missing.append(name)
      values.append(None)
      continue
    used.add(name)
    value = to_flax(np.asarray(state[name], np.float32))
    if value.shape != leaf.shape:
      # the torch shape the model wants (to_flax undone)
      want = ((leaf.shape[3], leaf.shape[2], *leaf.shape[:2]) if leaf.ndim == 4
              else leaf.shape[::-1])
      misshaped.append(f"{name} {tuple(np.shape(state[name]))} (expected {tuple(want)})")
    values.append(value)
  unexpected = sorted(k for k in set(state) - used if not k.startswith(ignore))
  if missing or unexpected or misshaped:
    problems = [f"{label}: {_shown(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if names]
    raise ValueError(f"the state_dict does not fit arch {arch!r} ({'; '.join(problems)}); "
                     f"check --arch (one of {', '.join(sorted(archs))}) and num_classes.")
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])


def statistics(mean: Iterable[float] | None, std: Iterable[float] | None,
               ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
  """``(mean, std)`` as tuples (hashable module fields), both None, or ValueError."""
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither.")
  return (None, None) if mean is None else (tuple(mean), tuple(std))

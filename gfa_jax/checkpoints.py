"""Checkpoints: the Orbax manager of a training workdir, its config, and ``load_model``.

A workdir holds ``config.json`` (the run's full config) and ``checkpoints/<step>/`` with two
Orbax items, ``params`` and ``opt_state``, so a model can be restored without knowing the
optimiser, and a third, ``model_state`` (``{'batch_stats': ...}``), for a model that has one.
A params-only checkpoint is one msgpack file with the run's config inside (``export_params``);
it is what ``results/`` commits. ``load_run_config`` and ``load_model`` take either.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gfa_jax import batching, data, distributed, models, penalty, reporting


def save_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
  reporting.write_atomically(Path(workdir) / "config.json", config.to_json_best_effort(indent=2).encode())


def _read_params_file(path: Path) -> dict:
  try:
    payload = flax.serialization.msgpack_restore(path.read_bytes())
    return {"config": ml_collections.ConfigDict(json.loads(payload["config"])),
            "params": payload["params"], "metadata": json.loads(payload["metadata"]),
            "model_state": payload.get("model_state", {})}
  except Exception as e:
    raise ValueError(f"{path} is not a readable params-only checkpoint ({e}); re-export it "
                     "with gfa_jax.checkpoints.export_params.") from e


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a training run (workdir or params-only file) was started with."""
  if Path(workdir).is_file():
    return _read_params_file(Path(workdir))["config"]
  if not Path(workdir).exists():
    raise FileNotFoundError(
        f"{workdir} does not exist. Pass --workdir of a training run (train.py writes "
        "runs/<config name> by default) or a params-only .msgpack checkpoint.")
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a gfa-jax training workdir. Train one with "
        "`python train.py --config configs/quickstart.py` or pass --workdir DIR of a run."
    )
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it from the run or retrain") from e
  if not isinstance(values, dict):
    raise ValueError(f"{path} holds a {type(values).__name__}, not a config; restore it")
  return ml_collections.ConfigDict(values)


# Every manager this process opened: `close_all` closes them before the interpreter exits, so
# Orbax's background threads and event loop do not outlive it (an error line followed by an
# asyncio "Event loop is closed" traceback, or a crash at shutdown).
_OPEN: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
  """Closes every checkpoint manager still open in this process; returns None. Called by the
  command lines (gfa_jax.cli) on every exit path."""
  for manager in list(_OPEN):
    try:
      manager.close()
    except Exception:  # noqa: BLE001 -- best effort on the way out; the real error is reported.
      pass
    _OPEN.discard(manager)


def causes(error: BaseException | None) -> list[BaseException]:
  """``error`` and the exceptions it was raised from or while handling, outermost first."""
  chain = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def os_error(error: BaseException, *, permission: bool = False) -> bool:
  """Whether ``error`` or an exception it wraps is an OSError (with ``permission``: a refused
  read or write, EACCES/EPERM). Orbax and TensorStore wrap the OSError in their own types, or
  keep only its text."""
  for e in causes(error):
    text = str(e).lower()
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
      return True
    if "permission denied" in text or "permission_denied" in text:
      return True
    if not permission and (isinstance(e, OSError) or "no space left" in text):
      return True
  return False


def permission_denied(error: BaseException) -> bool:
  """Whether ``error`` or an exception it wraps is a refused read or write (EACCES/EPERM)."""
  return os_error(error, permission=True)


def remove_partial_saves(workdir: str | Path) -> list[Path]:
  """Deletes the temporary folders of interrupted Orbax saves (``*.orbax-checkpoint-tmp*``)
  in ``workdir/checkpoints``; returns those removed. They are never a checkpoint, and a full
  disk must not stay full of them."""
  folder = Path(workdir) / "checkpoints"
  removed = sorted(folder.glob("*.orbax-checkpoint-tmp*")) if folder.is_dir() else []
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


def checkpoint_manager(workdir: str | Path, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The Orbax manager of ``workdir/checkpoints``.

  Saves are synchronous: a step's arrays are donated to the next train step, and the
  checkpoint is tiny next to a step's compute. Orbax writes each save into a temporary folder
  and renames it when complete, so a run killed mid-save resumes from the previous one.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints", options=options,
      item_names=("params", "opt_state", "model_state"))
  _OPEN.add(manager)
  return manager


def latest_step(workdir: str | Path) -> int | None:
  """The newest complete checkpoint step in ``workdir`` (None if there is none)."""
  if not (Path(workdir) / "checkpoints").is_dir():
    return None
  with checkpoint_manager(workdir) as manager:
    return manager.latest_step()


def _restore_target(tree: Any) -> Any:
  """Abstract arrays placed on this process's devices, whatever devices saved them: a run
  trained on N devices restores on one (and the reverse) instead of failing on topology."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=getattr(a, "sharding", None) or default), tree)


def restore(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any = None, *,
            model_state: dict | None = None):
  """Restores the items given as targets (arrays or ShapeDtypeStructs) at ``step``; an empty
  ``model_state`` (a model without state) is not read."""
  items = {"params": ocp.args.StandardRestore(_restore_target(params))}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(_restore_target(opt_state))
  if model_state:
    items["model_state"] = ocp.args.StandardRestore(_restore_target(model_state))
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax raises many types for unreadable data; name the fix.
    if permission_denied(e):  # An intact checkpoint this user may not read: not damage.
      raise PermissionError(
          f"checkpoint {manager.directory}/{step} is not readable by this user ({type(e).__name__}"
          f": {str(e)[:200]}); it was left as it is — give read access (chmod -R u+rX "
          f"{manager.directory}) and rerun") from e
    raise ValueError(
        f"checkpoint {manager.directory}/{step} could not be restored ({type(e).__name__}: "
        f"{e}). It is corrupt or from another model/config: delete that step folder to fall "
        "back to an older one, or retrain."
    ) from e


def export_params(path: str | Path, config: ml_collections.ConfigDict, params: Any,
                  metadata: dict | None = None, *, model_state: dict | None = None) -> None:
  """Writes a params-only checkpoint (one msgpack file) that ``load_model`` reads.

  ``config`` is the run's config (its ``model`` rebuilds the network; the rest, e.g. the
  task loss and data source, lets eval.py treat the file like a workdir); ``metadata`` is any
  JSON-ready provenance (step, command, accuracy); ``model_state`` the model's other
  collections (BatchNorm's ``{'batch_stats': ...}``; the variables ``load_model`` returned,
  less ``params``), which a model with state needs for inference.
  """
  payload = {"config": config.to_json_best_effort(), "metadata": json.dumps(metadata or {}),
             "params": jax.device_get(params)}
  if model_state:  # Absent for a model without state: such files stay as they were.
    payload["model_state"] = jax.device_get(dict(model_state))
  reporting.write_atomically(path, flax.serialization.msgpack_serialize(payload))


def init_variables(model, key: jax.Array, image_shape) -> tuple[Any, dict]:
  """``(params, model_state)`` of ``model`` initialised from ``key`` for images of
  ``image_shape`` (H, W, C): ``model_state`` is ``{'batch_stats': ...}`` for a BatchNorm model,
  ``{}`` for the others (whose params equal ``models.init_params``' for the same key)."""
  return split_variables(model.init(key, jax.numpy.zeros((1, *image_shape), jax.numpy.float32)))


def split_variables(variables: dict) -> tuple[Any, dict]:
  """``(params, model_state)`` of a model's variables; ``model_state`` holds the collections
  a training step carries and a checkpoint saves besides the parameters (``{}`` for most
  models), not GFA's taps and features, which ``model.init`` also returns."""
  kept = lambda name: name not in ("params", penalty.TAPS, penalty.FEATURES)
  state = {k: v for k, v in variables.items() if kept(k)}
  return variables["params"], state


def load_model(path: str | Path, step: int | None = None) -> tuple[Callable, dict]:
  """Loads a model for inference from a training workdir or a params-only checkpoint.

  Returns:
    ``(apply_fn, variables)``: ``apply_fn(variables, x)`` maps float32 NHWC images in [0, 1]
    to logits; ``variables`` is ``{'params': ...}`` plus the model's state (BatchNorm's
    ``batch_stats``), and ``apply_fn``'s default is inference mode (running averages).
    ``step`` picks a workdir checkpoint (default: the latest).
  """
  path = Path(path)
  payload = _read_params_file(path) if path.is_file() else None
  config = payload["config"] if payload else load_run_config(path)
  model = models.from_config(config.model)
  # The data a run trained on fixes the input shape (Fashion-MNIST 28x28x1, else CIFAR-10's).
  shape = data.image_shape(config.get("data_source", "auto"))
  target, state_target = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
  if payload:
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), (target, state_target))
    found = jax.tree.map(lambda a: (a.shape, a.dtype), (payload["params"], payload["model_state"]))
    if found != expected:
      raise ValueError(f"{path}: its parameters and state {found} do not match the model its "
                       f"config names ({expected}); re-export it with export_params (a model "
                       "with BatchNorm needs model_state=).")
    return model.apply, jax.tree.map(jax.numpy.asarray,
                                     {"params": payload["params"], **payload["model_state"]})
  with checkpoint_manager(path) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint {'' if step is None else f'at step {step} '}in {path}/checkpoints "
          f"(available: {list(manager.all_steps())}).")
    restored = restore(manager, step, target, model_state=state_target)
    return model.apply, {"params": restored["params"], **restored.get("model_state", {})}


# --------------------------------------------------------------------------------------------
# A training run's state: saved only when finite, restored past damaged checkpoints.


def save_train_state(manager: ocp.CheckpointManager, state: Any, step: int, workdir: Path) -> None:
  """Saves a train state's (``train_lib.TrainState``: params, opt_state, model_state) params,
  optimiser state and model state (where the model has one) as checkpoint ``step``; returns
  None.

  Raises FloatingPointError, saving nothing, if a parameter (or a BatchNorm statistic) is
  non-finite: the loss can be finite at the old parameters while the update overflows them,
  and a checkpoint must always be a state training can resume from.
  """
  kept = (state.params, state.model_state)
  if not all(np.isfinite(p).all() for p in jax.tree.leaves(batching.fetch(kept))):
    raise FloatingPointError(
        f"the parameters became non-finite by step {step} (the loss was finite at the "
        f"old ones); not saved. The last good checkpoint is step {manager.latest_step()} "
        f"in {workdir}; lower the learning rate, or set grad_clip_norm")
  items = {"params": state.params, "opt_state": state.opt_state}
  if state.model_state:  # A model without state saves the two items it always did.
    items["model_state"] = state.model_state
  try:
    manager.save(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardSave(v) for k, v in items.items()}), force=True)
  except Exception as e:
    # A full disk or a folder made read-only mid-run: Orbax leaves its temporary folder behind
    # and raises from deep inside. Remove the partial save, keep the last good checkpoint, say so.
    if distributed.is_primary():
      remove_partial_saves(workdir)
    if not os_error(e):
      raise
    raise OSError(f"saving checkpoint {step} in {workdir}/checkpoints failed ({type(e).__name__}: "
                  f"{str(e)[:160]}); the disk may be full or not writable. The last good "
                  f"checkpoint is step {manager.latest_step()}: free space, then rerun the same "
                  "command to resume from it") from e


def restore_train_state(manager: ocp.CheckpointManager, state: Any,
                        workdir: Path) -> tuple[int, Any]:
  """``(step, state)`` of the newest checkpoint in ``workdir`` that restores, ``(0, state)``
  if there is none. A damaged newer one (truncated by a full disk, a half-copied folder) is
  moved to ``workdir/damaged_checkpoints`` with a warning instead of stopping the run."""
  folder = workdir / "checkpoints"

  def set_aside(step, why):
    # Out of the manager's folder: a later save of that step must not collide with it. Every
    # process gets here for the same step (they read the same files); one moves it.
    target = workdir / "damaged_checkpoints" / str(step)
    distributed.sync(f"set aside checkpoint {step}")
    if distributed.is_primary():
      target.parent.mkdir(exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)
      (folder / str(step)).rename(target)
    distributed.sync(f"set aside checkpoint {step}: done")
    warnings.warn(f"skipping the damaged checkpoint {folder}/{step} ({why}); moved it to "
                  f"{target}", stacklevel=4)

  listed = set(manager.all_steps())
  on_disk = {int(d.name) for d in folder.iterdir() if d.name.isdigit()} if folder.is_dir() else set()
  for step in sorted(on_disk - listed):  # Orbax no longer reads it as a checkpoint.
    set_aside(step, "unreadable metadata")
  if on_disk - listed:
    manager.reload()
  for step in sorted(listed, reverse=True):
    try:
      restored = restore(manager, step, state.params, state.opt_state,
                                     model_state=state.model_state)
    except ValueError as e:
      set_aside(step, str(e)[:200])
      manager.reload()
      continue
    return step, state.replace(step=step, params=restored["params"],
                               opt_state=restored["opt_state"],
                               model_state=restored.get("model_state", state.model_state))
  if manager.all_steps():
    raise ValueError(f"no checkpoint in {workdir}/checkpoints restores (all damaged); delete "
                     "that folder to start again")
  return 0, state

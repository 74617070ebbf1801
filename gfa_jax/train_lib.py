"""Training: ``train_and_evaluate(config, workdir)``, the jitted data-parallel step and the loop.

Laid out as flax/examples lays it out: ``create_train_state``, ``make_train_step`` /
``make_eval_step`` and the loop in
``train_and_evaluate``. Nothing here is specific to one objective: what an objective needs
before its first step is its ``objectives.PREFLIGHTS`` hook, and the run folder's lock and
metrics file live in ``run_files``.

The step is compiled once and runs data-parallel over every local device: the batch is sharded
over a 1-D ``Mesh`` axis ``'data'``, parameters and optimiser state are replicated, and XLA
inserts the gradient all-reduce. The same code runs on 1 CPU, N fake CPU devices, GPU and
TPU, and over several processes (``gfa_jax.distributed``: each process puts only its own
devices' rows of the batch, and only process 0 locks the workdir and writes config, metrics
and the log; all of them write the checkpoints, through Orbax). Randomness is
``fold_in(key(seed), step)`` and the batch order a function of (seed, step), so resuming from a
checkpoint reproduces an uninterrupted run exactly.

The loop never waits for the device between steps: the next batch is gathered and put while a
step runs, and the metrics are read back only at logging, evaluation and saving steps, where
the finiteness check of every step since the last read (``_FiniteWatch``) names the first
non-finite one before anything is written.

Models with state (BatchNorm, dropout: ``__call__(x, train=False)``) carry their non-parameter
collections in ``TrainState.model_state`` (``{'batch_stats': ...}``, ``{}`` for the others):
the training forward pass updates them (``objectives.make_stateful_objective`` says which
passes run in training mode), checkpoints save them, and evaluation runs the model in
inference mode on them (running averages: an image's logits do not depend on its batch).
Under the data-parallel mesh the batch statistics are those of the global batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
import flax.struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gfa_jax import (batching, checkpoints, data, distributed, models, objectives, run_files,
                     validation)
from gfa_jax.penalty import gfa_objective, zero_taps
from gfa_jax.run_files import workdir_lock  # Also train_lib.workdir_lock, as before.

# Keys of metrics.jsonl whose value must be finite for training to go on.
MUST_BE_FINITE = ("loss", "grad_norm")


class TrainState(train_state.TrainState):
  """Flax's TrainState; the step also indexes the data order and the randomness.
  ``model_state``: the model's collections besides its parameters (``objectives.ModelState``)."""
  model_state: dict = flax.struct.field(default_factory=dict)


def training_model(config: ml_collections.ConfigDict):
  """The model the training step runs: ``config.model``'s, computing its convolutions and
  matmuls in ``config.compute_dtype`` (bfloat16 opt-in; parameters stay float32). Evaluation
  uses ``models.from_config(config.model)``, float32, as eval.py and the attacks do."""
  compute_dtype = config.get("compute_dtype", "float32")  # Runs from before the field.
  if compute_dtype == "float32":
    return models.from_config(config.model)
  return models.from_config({**dict(config.model), "dtype": compute_dtype})


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The Optax optimiser with the learning-rate schedule named in the config."""
  total_steps = config.num_epochs * steps_per_epoch
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "constant":
    # Without warm-up a constant rate from step 0 (a 1-step linear ramp would make it 0 there).
    schedule = (optax.linear_schedule(0.0, config.learning_rate, warmup_steps) if warmup_steps
                else optax.constant_schedule(config.learning_rate))
  elif config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else config.learning_rate, config.learning_rate,
        warmup_steps, max(total_steps, warmup_steps + 1))
  else:
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {config.schedule!r}")
  if config.optimizer == "adam":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  elif config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=0.9, nesterov=objectives.field(config, "nesterov")))
  else:
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices; the batch is split along its axis ``'data'``."""
  # Auto axes (jax.make_mesh's default became Explicit): the step's vmaps take unannotated
  # per-example arrays, and XLA chooses their sharding from the batch's.
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  if batch_size % mesh.size:
    raise ValueError(
        f"{what}={batch_size} does not divide evenly over {mesh.size} devices; pick a "
        f"multiple of {mesh.size} (e.g. --config.{what}={mesh.size * max(1, batch_size // mesh.size)})")


def make_train_step(config: ml_collections.ConfigDict, model, mesh: Mesh,
                    steps_per_epoch: int | None = None):
  """The compiled ``train_step(state, images_uint8, labels, key) -> (state, metrics)``.

  Augmentation runs on device inside the step (no per-example Python on the host). The state
  is donated: its buffers are reused for the new state. ``steps_per_epoch`` is needed only by
  a GFA beta ramp (``objectives.make_beta_schedule``).
  """
  objective = objectives.make_stateful_objective(config, model, steps_per_epoch)

  def train_step(state, images, labels, key):
    key = jax.random.fold_in(key, state.step)
    augment_key, objective_key = jax.random.split(key)
    x = data.augment(augment_key, data.to_float(images),
                     crop_padding=config.crop_padding, flip=config.flip)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, state.model_state, {"image": x, "label": labels, "step": state.step},
        objective_key)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads, model_state=model_state), metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(replicated, batch_sharded, batch_sharded, replicated),
                 out_shardings=(replicated, replicated))


def make_eval_step(config: ml_collections.ConfigDict, model, mesh: Mesh):
  """Compiled ``eval_step(variables, images_uint8, labels) -> per-example metrics`` of one
  batch; ``variables`` is ``{'params': ..., **model_state}``, run in inference mode.

  Returns {'correct', 'task_loss'} and, with ``objectives.logs_alignment(config)`` (GFA
  runs, or ``config.eval_alignment``), ``alignment/<layer>`` cosines of every tapped layer,
  each [B]: per example, so ``evaluate`` can run it through ``batching.map_batches`` (one
  padded batch shape, padded rows dropped). The cosines cost GFA's extra backward pass and are
  skipped otherwise; an image's cosine does not depend on its batch (a cosine does not see
  the batch mean's 1/B).
  """
  task_loss = objectives.make_task_loss(config)
  alignment = objectives.logs_alignment(config)
  # The run's batch loss of each example alone (its mean over a batch is the batch loss).
  per_example_loss = jax.vmap(lambda logits, y: task_loss(logits[None], y[None]))

  def eval_step(variables, images, labels):
    x = data.to_float(images)
    if alignment:
      params, model_state = checkpoints.split_variables(variables)
      layers = tuple(zero_taps(model.apply, variables, x))  # Every tapped layer.
      _, aux = gfa_objective(model.apply, params, x, labels, task_loss, layers=layers,
                             **({"state": model_state} if model_state else {}))
      logits = aux["logits"]
    else:
      logits = model.apply(variables, x)
    out = {"correct": jnp.argmax(logits, -1) == labels,
           "task_loss": per_example_loss(logits, labels)}
    if alignment:
      out.update({f"alignment/{k}": v for k, v in aux["cosines"].items()})
    return out

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(eval_step, in_shardings=(replicated, batch_sharded, batch_sharded),
                 out_shardings=batch_sharded)


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh: Mesh) -> dict[str, float]:
  """Accuracy, task loss and (where ``eval_step`` computes it) per-layer alignment over
  ``images``, as ``{name: mean over the images}``, in padded batches of one shape split over
  the training mesh. ``variables``: ``{'params': ..., **model_state}``."""
  per_example = batching.map_batches(functools.partial(eval_step, variables), [images, labels],
                                     batch_size, sharding=NamedSharding(mesh, PartitionSpec("data")))
  means = {k: float(np.mean(v, dtype=np.float64)) for k, v in per_example.items()}
  return {"accuracy": means.pop("correct"), **means}


class Splits(NamedTuple):
  """The images (uint8 NHWC) and labels a run trains and evaluates on."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  description: str  # Where the data came from, for the log.


def load_splits(config: ml_collections.ConfigDict) -> Splits:
  """The dataset of ``config.data_source``, cut to ``num_train`` training and
  ``num_eval_examples`` test images (0: all). A cut larger than the data set is refused: it
  would train on fewer images than config.json records."""
  dataset = data.load_dataset(config.data_source, config.data_dir or None,
                              download=config.get("download", False))
  for field, split in (("num_train", "train"), ("num_eval_examples", "test")):
    available = len(getattr(dataset, f"{split}_labels"))
    if config[field] > available:
      raise ValueError(f"config.{field}={config[field]} but {dataset.description} has only "
                       f"{available} {split} images; use --config.{field}={available} or less "
                       "(0: all), or point data_dir at a larger data set")
  train_images, train_labels = dataset.train_images, dataset.train_labels
  if config.num_train:
    train_images, train_labels = train_images[:config.num_train], train_labels[:config.num_train]
  test_images, test_labels = dataset.test_images, dataset.test_labels
  if config.num_eval_examples:
    test_images, test_labels = test_images[:config.num_eval_examples], test_labels[:config.num_eval_examples]
  return Splits(train_images, train_labels, test_images, test_labels, dataset.description)


def _check_eval_batches(config: ml_collections.ConfigDict, splits: Splits, mesh: Mesh) -> None:
  """Evaluation batches (all padded to min(eval_batch_size, N)) must split over the devices
  too; found here, not at the first evaluation after training steps."""
  for n in (len(splits.test_images), min(config.num_train_eval_examples, len(splits.train_images))):
    check_divisible(min(config.eval_batch_size, n), mesh, "eval_batch_size")


def create_train_state(config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...],
                       key: jax.Array, steps_per_epoch: int) -> TrainState:
  """The step-0 TrainState: ``model``'s parameters (and ``model_state``, e.g. BatchNorm's
  statistics) initialised from ``key`` for images of ``image_shape`` (H, W, C, taken from the
  data) and the optimiser of ``config``, whose schedule needs ``steps_per_epoch``. Also the
  target a checkpoint restores into."""
  tx = make_optimizer(config, steps_per_epoch)
  params, model_state = checkpoints.init_variables(model, key, image_shape)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, model_state=model_state)


def _preflight(config: ml_collections.ConfigDict, model, state: TrainState,
               splits: Splits) -> None:
  """Runs the check the objective declares (``objectives.PREFLIGHTS``) on the step-0 batch."""
  check = objectives.PREFLIGHTS.get(config.objective)
  if check:
    first = data.train_batch_indices(len(splits.train_images), config.batch_size, config.seed, 0)
    check(config, model, state.params, {"image": data.to_float(splits.train_images[first]),
                                        "label": splits.train_labels[first]},
          model_state=state.model_state)


def _check_finite(metrics: dict, step: int, manager, workdir: Path) -> None:
  """Raises FloatingPointError naming the step and the last good checkpoint if a
  MUST_BE_FINITE metric is not finite (the state of ``step`` is then never saved)."""
  bad = [k for k in MUST_BE_FINITE if not np.isfinite(metrics[k])]
  if bad:
    raise FloatingPointError(
        f"non-finite {', '.join(bad)} at step {step} ({ {k: float(metrics[k]) for k in bad} }); "
        f"stopped before saving it. The last good checkpoint is step {manager.latest_step()} "
        f"in {workdir}. Lower the learning rate or beta, or set grad_clip_norm.")


class _FiniteWatch:
  """The MUST_BE_FINITE metrics of the steps since the last check, kept on the device.

  Reading them after every step would make the device wait for the host at every step; they
  are read together (one transfer) before anything is logged, evaluated or saved, and the
  first non-finite step among them is named, as a check after every step would have named it.
  """

  def __init__(self):
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    """Keeps ``step``'s metrics (device arrays) for the next ``check``; returns None."""
    self.pending.append((step, {k: metrics[k] for k in MUST_BE_FINITE}))

  def check(self, manager, workdir: Path) -> None:
    """``_check_finite`` of every pending step in order; returns None (raises on the first)."""
    pending, self.pending = self.pending, []
    for (step, _), metrics in zip(pending, batching.fetch([m for _, m in pending])):
      _check_finite(metrics, step, manager, workdir)


def _put_batch(splits: Splits, config: ml_collections.ConfigDict, step: int, sharding):
  """Step ``step``'s (images, labels), gathered on the host and placed with ``sharding``."""
  indices = data.train_batch_indices(len(splits.train_images), config.batch_size, config.seed,
                                     step)
  return (batching.put_rows(splits.train_images, indices, sharding),
          batching.put_rows(splits.train_labels, indices, sharding))


def _evaluate_splits(eval_step, variables, splits: Splits, config: ml_collections.ConfigDict,
                     mesh: Mesh, step: int) -> dict:
  """The metrics.jsonl eval record of ``step``: ``test/<metric>`` over the test images and
  ``train/<metric>`` over the first ``num_train_eval_examples`` training images."""
  n = min(config.num_train_eval_examples, len(splits.train_images))
  test = evaluate(eval_step, variables, splits.test_images, splits.test_labels,
                  config.eval_batch_size, mesh)
  train = evaluate(eval_step, variables, splits.train_images[:n], splits.train_labels[:n],
                   config.eval_batch_size, mesh)
  return {"step": step, "kind": "eval", **{f"test/{k}": v for k, v in test.items()},
          **{f"train/{k}": v for k, v in train.items()}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint; returns the final
  evaluation record (test and train accuracy and task loss, and per-layer alignment where
  ``objectives.logs_alignment``).

  Writes ``config.json``, ``metrics.jsonl`` (one JSON object per log/eval event) and Orbax
  checkpoints. Raises FloatingPointError naming the step if the loss or gradient becomes
  non-finite; the last checkpoint (always from a finite state) stays intact.
  """
  workdir = Path(workdir)
  # Everything that can be wrong with the request is found before the workdir is touched.
  validation.validate_config(config)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file; pass a folder (new or a run's) instead")
  splits = load_splits(config)
  mesh = make_mesh()
  check_divisible(config.batch_size, mesh)
  _check_eval_batches(config, splits, mesh)
  num_train = len(splits.train_images)
  steps_per_epoch = data.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  model = training_model(config)
  # The step key is folded with the step inside train_step: a resumed run draws the same.
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(config, model, splits.train_images.shape[1:], init_key,
                             steps_per_epoch)
  run_files.check_config_matches(workdir, config)

  primary = distributed.is_primary()  # the one process that writes files and logs
  log = print if primary else lambda *_: None
  with workdir_lock(workdir) if primary else contextlib.nullcontext():
    distributed.sync("workdir locked")  # no process writes before process 0 holds the lock
    if primary:
      checkpoints.save_config(workdir, config)
    manager = checkpoints.checkpoint_manager(workdir, max_to_keep=config.max_to_keep)
    metrics_path = workdir / "metrics.jsonl"
    start_step, state = checkpoints.restore_train_state(manager, state, workdir)
    if primary:
      run_files.drop_metrics_after(metrics_path, start_step)
    write_metrics = (functools.partial(run_files.write_metrics, metrics_path) if primary
                     else lambda record: None)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    if not start_step:
      _preflight(config, model, state, splits)
    train_step = make_train_step(config, model, mesh, steps_per_epoch)
    eval_step = make_eval_step(config, models.from_config(config.model), mesh)  # float32

    def run_eval(step):
      record = _evaluate_splits(eval_step, {"params": state.params, **state.model_state},
                                splits, config, mesh, step)
      write_metrics(record)
      return record

    log(f"Training {config.model.name} ({config.objective}) on {splits.description}: "
        f"{num_train} images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"{mesh.size} device(s) [{jax.devices()[0].platform}]"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", workdir {workdir}"
        + (f", resumed at step {start_step}" if start_step else ""))
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not primary)
    record = {}
    last_time, last_step = time.perf_counter(), start_step
    watch = _FiniteWatch()
    try:
      # One step ahead: the next batch is gathered and put while the step runs (dispatch is
      # asynchronous), and nothing is read back except at logging, evaluation and saving steps.
      batch = (_put_batch(splits, config, start_step, batch_sharding)
               if start_step < total_steps else None)
      for step in range(start_step, total_steps):
        state, metrics = train_step(state, *batch, step_key)
        done = step + 1
        if done < total_steps:
          batch = _put_batch(splits, config, done, batch_sharding)
        watch.add(done, metrics)
        progress.update(1)
        log_now = done % config.log_every_steps == 0 or done == total_steps
        eval_now = ((config.eval_every_steps and done % config.eval_every_steps == 0)
                    or done == total_steps)
        save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
        if log_now or eval_now or save_now:
          watch.check(manager, workdir)  # Nothing non-finite is logged, evaluated or saved.
        if log_now:
          metrics = batching.fetch(metrics)
          now = time.perf_counter()
          record = {"step": done, "kind": "train", "epoch": done / steps_per_epoch,
                    "seconds_per_step": (now - last_time) / (done - last_step),
                    **{k: float(v) for k, v in metrics.items()}}
          last_time, last_step = now, done
          write_metrics(record)
          progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
        if eval_now:
          record = run_eval(done)
          if primary:
            progress.write(_format_eval(record))
        if save_now:
          checkpoints.save_train_state(manager, state, done, workdir)
    finally:
      progress.close()
    manager.wait_until_finished()
    if start_step == total_steps:  # Nothing left to train: report the final evaluation.
      logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
      final = [r for r in logged if r["kind"] == "eval" and r["step"] == total_steps]
      record = final[-1] if final else run_eval(total_steps)
      log(_format_eval(record))
    return record


def _format_eval(record: dict) -> str:
  """One line for the log: test accuracy and, where logged, the per-layer alignment."""
  alignment = lambda split: " ".join(
      f"{k.split('/')[-1]}={v:.3f}" for k, v in record.items()
      if k.startswith(f"{split}/alignment/"))
  line = f"step {record['step']}: test acc {record['test/accuracy']:.4f}"
  if alignment("test"):
    line += f"  train alignment [{alignment('train')}]  test alignment [{alignment('test')}]"
  return line

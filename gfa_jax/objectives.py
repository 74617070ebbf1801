"""Training objectives, one signature for all: ``objective(params, batch, key) -> (loss, metrics)``.

Models with state (BatchNorm statistics, dropout: ``__call__(x, train=False)``) train through
``make_stateful_objective``, ``objective(params, model_state, batch, key) -> (loss, (metrics,
model_state))``; see "Models with state" below for which forward passes run in which mode.

``batch`` holds ``image`` (float [B, H, W, C] in [0, 1]) and ``label`` (int [B]), and during
training also ``step``, the optimiser step, which drives the GFA beta schedule.

``make_objective(config, model)`` picks one of

- ``standard``: the task loss.
- ``gfa``: ``alpha * task_loss + beta * GFA penalty`` on the layers ``config.gfa_layers``
  (DeepDefense; FIRST = ``('layer0',)``, DEEP = ``('layer0', 'layer1', 'layer2')``).
- ``pgd_at``: Madry et al. 2018, the task loss at a PGD example (the same ``pgd`` eval runs).
- ``trades``: Zhang et al. 2019, task loss + ``trades_beta * KL(p(x) || p(x_adv))``.
- ``gradalign``: Andriushchenko & Flammarion 2020, task loss at an FGSM example +
  ``gradalign_lambda * (1 - cos(grad_x L(x), grad_x L(x + noise)))``.

Task losses (``config.task_loss``): ``ce``, or ``mse``, the paper's classification MSE: the
squared error between the one-hot label and the softmax probabilities
(``config.mse_outputs='softmax'``, the default: bounded outputs compared with a bounded
target, as in the paper's setup) or the raw logits (``'logits'``), averaged over batch and
classes like PyTorch's ``nn.MSELoss()``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.attacks.pgd import pgd
from gfa_jax.penalty import gfa_objective, per_sample_cosine

Batch = dict[str, jax.Array]
Objective = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
ModelState = dict[str, Any]  # The non-'params' collections, e.g. {'batch_stats': ...}.
StatefulObjective = Callable[[Any, ModelState, Batch, jax.Array],
                             tuple[jax.Array, tuple[dict[str, jax.Array], ModelState]]]
TaskLoss = Callable[[jax.Array, jax.Array], jax.Array]
Preflight = Callable[..., None]  # (config, model, params, batch, model_state=None) -> None

# The names make_objective and make_task_loss accept, in one place: validation checks a config
# against them before anything runs, so a new objective is registered here and in
# make_objective only.
OBJECTIVES = ("standard", "gfa", "pgd_at", "trades", "gradalign")
TASK_LOSSES = ("mse", "ce")
MSE_OUTPUTS = ("softmax", "logits")
# Objectives that tap layer inputs for their loss; their evaluations log the per-layer
# alignment (the others do only with config.eval_alignment, as it costs a backward pass).
TAPPED_OBJECTIVES = ("gfa",)


# Config fields added after the first release, with the value a config without them means
# (configs/default.py sets the same): older run configs resume, older checkpoints load.
ADDED_FIELDS = {"gfa_gradient": "exact", "gfa_direction": "align", "gfa_reduction": "mean",
                "nesterov": False, "eval_alignment": False, "compute_dtype": "float32"}


def field(config: ml_collections.ConfigDict, name: str):
  """config.name, or its ADDED_FIELDS default where the config predates the field."""
  return config.get(name, ADDED_FIELDS[name])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Batch-mean softmax cross-entropy."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def mse(outputs: str) -> TaskLoss:
  """The classification MSE between one-hot labels and softmax(logits) or the logits."""
  if outputs not in MSE_OUTPUTS:
    raise ValueError(f"mse_outputs must be 'softmax' or 'logits', got {outputs!r}")

  def loss(logits, labels):
    predictions = jax.nn.softmax(logits) if outputs == "softmax" else logits
    target = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean((predictions - target) ** 2)

  return loss


def make_task_loss(config: ml_collections.ConfigDict) -> TaskLoss:
  if config.task_loss == "ce":
    return cross_entropy
  if config.task_loss == "mse":
    return mse(config.mse_outputs)
  raise ValueError(f"task_loss must be 'mse' or 'ce', got {config.task_loss!r}")


def logs_alignment(config: ml_collections.ConfigDict) -> bool:
  """Whether evaluations of this config compute the per-layer GFA alignment: always for an
  objective that taps layer inputs, else only when ``config.eval_alignment`` asks for it."""
  return config.objective in TAPPED_OBJECTIVES or bool(field(config, "eval_alignment"))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def input_gradient(logits_fn: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
  """``d cross_entropy / d x`` of the batch (row i is sample i's gradient up to 1/B)."""
  return jax.grad(lambda x: cross_entropy(logits_fn(x), y))(x)


def kl_divergence(logits: jax.Array, clean_probs: jax.Array) -> jax.Array:
  """Per-example ``KL(clean_probs || softmax(logits))``, the TRADES attack and penalty."""
  log_probs = jax.nn.log_softmax(logits)
  return jnp.sum(clean_probs * (jnp.log(jnp.clip(clean_probs, 1e-12)) - log_probs), axis=-1)


def make_beta_schedule(config: ml_collections.ConfigDict,
                       steps_per_epoch: int | None) -> optax.Schedule:
  """GFA's beta as a function of the step: 0 for ``beta_ramp_start_epochs``, then a linear
  ramp to ``config.beta`` over ``beta_ramp_epochs`` (both 0: ``config.beta`` throughout).

  Exists because a constant beta either leaves the alignment at 0 or collapses accuracy
  (docs/results.md); a delayed or ramped penalty lets the task be learnt first.
  """
  start, ramp = config.beta_ramp_start_epochs, config.beta_ramp_epochs
  if start < 0 or ramp < 0:
    raise ValueError(f"beta_ramp_start_epochs and beta_ramp_epochs must be >= 0, got {start}, {ramp}")
  if not start and not ramp:
    return optax.constant_schedule(config.beta)
  if steps_per_epoch is None:
    raise ValueError("a beta ramp (beta_ramp_start_epochs / beta_ramp_epochs) needs "
                     "make_objective(..., steps_per_epoch=N)")
  return optax.linear_schedule(0.0, config.beta, transition_steps=max(1, int(ramp * steps_per_epoch)),
                               transition_begin=int(start * steps_per_epoch))


def gfa_layer_weights(config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """``{layer: weight}`` from ``config.gfa_layer_weights`` (per-layer beta = beta * weight),
  or None for equal weights. Exists so the length is checked once, with the fix in the error."""
  weights = tuple(config.get("gfa_layer_weights", ()) or ())
  if not weights:
    return None
  layers = tuple(config.gfa_layers)
  if len(weights) != len(layers) or any(w < 0 for w in weights):
    raise ValueError(f"gfa_layer_weights {weights} must hold one weight >= 0 per layer of "
                     f"gfa_layers {layers}, or be () for equal weights.")
  return dict(zip(layers, map(float, weights)))


def constant_penalty_layers(config: ml_collections.ConfigDict, model: nn.Module,
                            params: Any, images: jax.Array, labels: jax.Array,
                            tol: float = 1e-6, model_state: ModelState | None = None) -> list[str]:
  """The tapped layers of ``config.gfa_layers`` whose cosine is 0 for every sample of a batch.

  Exists to catch taps whose penalty can never train: if the loss is invariant to rescaling a
  layer input h (a bias-free layer followed by a normalisation, such as ResNet-20's layer0),
  then <dL/dh, h> = 0 for every sample and every parameter value, so that layer's penalty is
  the constant 1. A tap with generic features has |cos| of order 1/sqrt(dim) (about 1e-2), far
  above ``tol``. Returns the names, [] when every tap can align. A model with ``train`` is
  checked in training mode with ``model_state``, as it trains (a bias-free convolution
  followed by BatchNorm on batch statistics is scale invariant; on running averages not).
  """
  training = _training_call(model, model_state or {}, jax.random.key(0))
  _, aux = jax.jit(lambda p, x, y: gfa_objective(
      model.apply, p, x, y, make_task_loss(config), layers=tuple(config.gfa_layers),
      eps=config.gfa_eps, **training))(params, images, labels)
  return [name for name, cos in aux["cosines"].items() if float(jnp.max(jnp.abs(cos))) <= tol]


# --------------------------------------------------------------------------------------------
# Models with state. A model whose ``__call__`` takes ``train`` (BatchNorm, dropout) runs in
# training mode (batch statistics, dropout on, ``batch_stats`` updated) only in the forward
# pass(es) the loss is computed on; everything else sees it as evaluation does (running
# averages, no dropout): the inner attacks of pgd_at / trades / gradalign and GradAlign's
# input-gradient regulariser. Why inference mode for the attacks: it is TRADES' reference
# recipe (``model.eval()`` around the attack); the perturbation of one image then does not
# depend on the other images of the batch (batch statistics would couple them); the attack
# iterations never touch the running averages, which only the loss's forward passes update;
# and the attack is the one the model meets at evaluation. (Many PGD-AT code bases attack in
# training mode instead; with BatchNorm momentum 0.1 the running averages trail the batch
# statistics by a few steps, so early attacks are slightly weaker.) A model without ``train``
# has no modes and is called exactly as before these models existed.
DROPOUT_STREAM = 0x64726F70  # fold_in constant: a step's dropout key, apart from its attack key.


def takes_train_flag(model: nn.Module) -> bool:
  """Whether ``model.__call__`` takes ``train`` (training mode: batch statistics, dropout)."""
  return "train" in inspect.signature(type(model).__call__).parameters


def _training_call(model: nn.Module, model_state: ModelState, key: jax.Array | None) -> dict:
  """``gfa_objective``'s keywords for a training forward pass of ``model`` (``{}`` for a
  model without modes or state, so it runs exactly as before)."""
  if not takes_train_flag(model):
    return {"state": model_state} if model_state else {}
  return {"state": model_state, "mutable": tuple(model_state), "apply_kwargs": {"train": True},
          "rngs": {"dropout": jax.random.fold_in(key, DROPOUT_STREAM)}}


def make_objective(config: ml_collections.ConfigDict, model: nn.Module,
                   steps_per_epoch: int | None = None) -> Objective:
  """``make_stateful_objective``'s objective as ``objective(params, batch, key) -> (loss,
  metrics)`` for a model without state (no BatchNorm statistics; dropout is fine): the
  signature tests, benchmarks and scripts call."""
  stateful = make_stateful_objective(config, model, steps_per_epoch)

  def objective(params, batch, key):
    loss, (metrics, _) = stateful(params, {}, batch, key)
    return loss, metrics

  return objective


def make_stateful_objective(config: ml_collections.ConfigDict, model: nn.Module,
                            steps_per_epoch: int | None = None) -> StatefulObjective:
  """The objective named by ``config.objective`` for ``model`` (see module docstring), as
  ``objective(params, model_state, batch, key) -> (loss, (metrics, model_state))``: the
  returned ``model_state`` is the one the loss's training forward passes leave (updated
  ``batch_stats``; ``model_state`` unchanged for a model without ``train``).

  ``steps_per_epoch`` converts the beta schedule's epochs to steps; a batch without ``step``
  (evaluation) gets the schedule's final beta. ``key`` seeds the attacks and, for a model with
  ``train``, dropout (``fold_in(key, DROPOUT_STREAM)``).
  """
  task_loss = make_task_loss(config)
  beta_schedule = make_beta_schedule(config, steps_per_epoch) if config.objective == "gfa" else None
  layer_weights = gfa_layer_weights(config) if config.objective == "gfa" else None
  adv = config.adversary
  modes = takes_train_flag(model)

  def logits_fn(params, model_state):
    """The model in inference mode (what the attacks and evaluation see)."""
    return lambda x: model.apply({"params": params, **model_state}, x)

  def train_forward(params, model_state, x, key):
    """``(logits, model_state)`` of a forward pass the loss is computed on."""
    if not modes:
      return model.apply({"params": params, **model_state}, x), model_state
    logits, updates = model.apply(
        {"params": params, **model_state}, x, train=True, mutable=list(model_state),
        rngs={"dropout": jax.random.fold_in(key, DROPOUT_STREAM)})
    return logits, {**model_state, **updates}

  def standard(params, model_state, batch, key):
    logits, model_state = train_forward(params, model_state, batch["image"], key)
    loss = task_loss(logits, batch["label"])
    return loss, ({"task_loss": loss, "accuracy": accuracy(logits, batch["label"])}, model_state)

  def gfa(params, model_state, batch, key):
    beta = beta_schedule(batch["step"]) if "step" in batch else jnp.asarray(config.beta)
    # With BatchNorm in training mode the cosine of a sample sees the others through the
    # batch statistics (penalty.linen_parts says how); the loss and dL/dh share that pass.
    loss, aux = gfa_objective(
        model.apply, params, batch["image"], batch["label"], task_loss,
        layers=tuple(config.gfa_layers), alpha=config.alpha, beta=beta,
        eps=config.gfa_eps, layer_weights=layer_weights,
        gradient=field(config, "gfa_gradient"), direction=field(config, "gfa_direction"),
        reduction=field(config, "gfa_reduction"), **_training_call(model, model_state, key),
    )
    metrics = {"task_loss": aux["task_loss"], "penalty": aux["penalty"], "beta": beta,
               "accuracy": accuracy(aux["logits"], batch["label"])}
    metrics.update({f"alignment/{k}": v for k, v in aux["alignment"].items()})
    return loss, (metrics, {**model_state, **aux.get("state", {})})

  def pgd_at(params, model_state, batch, key):
    x, y = batch["image"], batch["label"]
    # Madry et al. train on the last PGD iterate (pgd's result carries no gradient).
    x_adv = pgd(logits_fn(params, model_state), x, y, key=key, eps=adv.eps, steps=adv.steps,
                step_size=adv.step_size, keep_best=False)
    logits, model_state = train_forward(params, model_state, x_adv, key)
    loss = task_loss(logits, y)
    return loss, ({"task_loss": loss, "accuracy": accuracy(logits, y)}, model_state)

  def trades(params, model_state, batch, key):
    x, y = batch["image"], batch["label"]
    clean_logits, trained_state = train_forward(params, model_state, x, key)
    # The attack's target is the inference-mode prediction (the reference computes it under
    # model.eval()); without modes that is clean_logits, reused.
    target_logits = logits_fn(params, model_state)(x) if modes else clean_logits
    clean_probs = jax.lax.stop_gradient(jax.nn.softmax(target_logits))
    # TRADES starts its inner maximisation at x + 0.001 * N(0, 1), not a uniform draw.
    x_init = x + 0.001 * jax.random.normal(key, x.shape, x.dtype)
    x_adv = pgd(logits_fn(params, model_state), x, clean_probs, key=key, eps=adv.eps,
                steps=adv.steps, step_size=adv.step_size, loss=kl_divergence, x_init=x_init,
                keep_best=False)
    clean_loss = task_loss(clean_logits, y)
    # The second training pass (as the reference's model(x_adv) in train mode) updates the
    # statistics again, from the adversarial batch; its own dropout key.
    adv_logits, trained_state = train_forward(params, trained_state, x_adv,
                                              None if key is None else jax.random.fold_in(key, 1))
    robust_loss = jnp.mean(kl_divergence(adv_logits, jax.nn.softmax(clean_logits)))
    loss = clean_loss + adv.trades_beta * robust_loss
    return loss, ({"task_loss": clean_loss, "penalty": robust_loss,
                   "accuracy": accuracy(clean_logits, y)}, trained_state)

  def gradalign(params, model_state, batch, key):
    x, y = batch["image"], batch["label"]
    noise_key, fgsm_key = jax.random.split(key)
    model_fn = logits_fn(params, model_state)  # The attack and the regulariser: inference.
    x_adv = jax.lax.stop_gradient(fgsm(model_fn, x, y, key=fgsm_key, eps=adv.eps))
    logits, trained_state = train_forward(params, model_state, x_adv, key)
    loss = task_loss(logits, y)
    noise = jax.random.uniform(noise_key, x.shape, x.dtype, -adv.eps, adv.eps)
    cos = per_sample_cosine(input_gradient(model_fn, x, y),
                            input_gradient(model_fn, jnp.clip(x + noise, 0, 1), y))
    penalty = 1.0 - jnp.mean(cos)
    return loss + adv.gradalign_lambda * penalty, (
        {"task_loss": loss, "penalty": penalty, "accuracy": accuracy(logits, y)}, trained_state)

  objectives = {"standard": standard, "gfa": gfa, "pgd_at": pgd_at, "trades": trades,
                "gradalign": gradalign}
  assert tuple(objectives) == OBJECTIVES, "register a new objective in OBJECTIVES too"
  if config.objective not in objectives:
    raise ValueError(f"unknown objective {config.objective!r}; choose one of {sorted(objectives)}")
  return objectives[config.objective]


def gfa_preflight(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
                  batch: Batch, model_state: ModelState | None = None) -> None:
  """Warns about the taps of ``config.gfa_layers`` whose penalty is constant at
  initialisation (``constant_penalty_layers`` on ``batch``); returns None. Exists so such a
  run is flagged before it spends its budget training a penalty that cannot move."""
  constant = constant_penalty_layers(config, model, params, batch["image"], batch["label"],
                                     model_state=model_state)
  if constant:
    warnings.warn(
        f"GFA's cosine is 0 for every sample at {constant} at initialisation: the loss is "
        "invariant to rescaling those layer inputs (a bias-free layer followed by a "
        "normalisation), so their penalty is the constant 1 and trains nothing. Remove them "
        f"from gfa_layers (now {list(config.gfa_layers)}).", stacklevel=3)


# Checks an objective declares, run once before the first step of a new run (not on resume)
# on the initial parameters and the step-0 batch (float images in [0, 1]):
# ``preflight(config, model, params, batch, model_state=None) -> None``; each may warn or
# raise. They live with their objective so the training loop stays free of objective-specific
# code.
PREFLIGHTS: dict[str, Preflight] = {"gfa": gfa_preflight}

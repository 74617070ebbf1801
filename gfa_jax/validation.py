"""The whole training config checked before anything is written, loaded or compiled.

A typo must not cost a compile, leave a workdir that refuses the corrected command, or train
to the end with a meaningless setting (a negative learning rate trains "fine"). Each problem
raises one ValueError naming the field, the value and the fix.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from gfa_jax import checkpoints, data, models, objectives, penalty

CHOICES = {
    "objective": objectives.OBJECTIVES, "task_loss": objectives.TASK_LOSSES,
    "mse_outputs": objectives.MSE_OUTPUTS,
    "optimizer": ("adam", "sgd"), "schedule": ("constant", "cosine"),
    "data_source": data.SOURCES, "gfa_gradient": penalty.GRADIENTS,
    "gfa_direction": penalty.DIRECTIONS, "gfa_reduction": penalty.REDUCTIONS,
}
POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
                 "checkpoint_every_steps", "max_to_keep")
NON_NEGATIVE_INTS = ("eval_every_steps", "num_train", "num_eval_examples",
                     "num_train_eval_examples", "crop_padding", "seed")
COMPUTE_DTYPES = ("float32", "bfloat16")  # config.compute_dtype (train_lib.training_model)
NON_NEGATIVE_FLOATS = ("beta", "alpha", "weight_decay", "grad_clip_norm", "warmup_epochs",
                       "beta_ramp_start_epochs", "beta_ramp_epochs")


def _bad(field: str, value, fix: str) -> ValueError:
  return ValueError(f"config.{field}={value!r} is invalid; {fix} (--config.{field}=...)")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the first invalid field of a training config; returns None."""
  for field, allowed in CHOICES.items():
    value = objectives.field(config, field) if field in objectives.ADDED_FIELDS else config.get(field)
    if value not in allowed:
      raise _bad(field, value, f"choose one of {list(allowed)}")
  if not isinstance(objectives.field(config, "eval_alignment"), bool):
    raise _bad("eval_alignment", config.get("eval_alignment"), "use True or False")
  if not isinstance(config.get("download", False), bool):
    raise _bad("download", config.get("download"), "use True or False")
  if config.get("download", False) and config.data_source not in data.DOWNLOADABLE:
    raise _bad("download", True, f"TFDS downloads CIFAR-10 for data_source "
               f"{list(data.DOWNLOADABLE)}, not {config.data_source!r}; drop it or change source")
  for field in POSITIVE_INTS + NON_NEGATIVE_INTS:
    value = config.get(field)
    low = 1 if field in POSITIVE_INTS else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise _bad(field, value, f"use an integer >= {low}")
  for field in ("learning_rate", "gfa_eps"):
    value = config.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
      raise _bad(field, value, "use a number > 0")
  for field in NON_NEGATIVE_FLOATS + ("learning_rate", "gfa_eps"):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise _bad(field, value, "use a finite number")
    if value < 0:
      raise _bad(field, value, "use a number >= 0")
  for field in ("learning_rate", "gfa_eps"):
    if not config.get(field) > 0:
      raise _bad(field, config.get(field), "use a number > 0")
  adv = config.adversary
  if not (math.isfinite(adv.eps) and 0 <= adv.eps <= 1):
    raise _bad("adversary.eps", adv.eps, "use a Linf radius in [0, 1] (pixel units, e.g. 8/255)")
  if not (isinstance(adv.steps, int) and adv.steps >= 1):
    raise _bad("adversary.steps", adv.steps, "use an integer >= 1")
  model_config = dict(config.model)
  name = model_config.pop("name", None)
  model = models.create_model(name, **model_config)  # Names unknown models and fields.
  if "dtype" in model_config:  # The checkpoint's model would then evaluate in it too.
    raise _bad("model.dtype", model_config["dtype"], "drop it and set config.compute_dtype: "
               "only training computes in bfloat16, evaluation and attacks in float32")
  compute_dtype = config.get("compute_dtype", "float32")  # Runs from before the field: float32.
  if compute_dtype not in COMPUTE_DTYPES:
    raise _bad("compute_dtype", compute_dtype, f"choose one of {list(COMPUTE_DTYPES)}")
  if compute_dtype != "float32" and not hasattr(model, "dtype"):
    able = [n for n, cls in models.MODELS.items() if "dtype" in cls.__dataclass_fields__]
    raise _bad("compute_dtype", compute_dtype, f"model {name!r} computes in float32 only "
               f"(bfloat16: {', '.join(able)}); use float32")
  try:  # Builds it, abstractly: a width of 0 or a word where widths belong fails here.
    taps = _tap_names(model, data.image_shape(config.data_source))
  except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
    raise _bad("model", config.model.to_dict(), "this model cannot be built with these fields "
               f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
  if config.objective == "gfa":
    unknown = [t for t in config.gfa_layers if t not in taps]
    if unknown or not config.gfa_layers:
      raise _bad("gfa_layers", tuple(config.gfa_layers),
                 f"tap at least one of this model's layer inputs {taps} (unknown: {unknown})")
    objectives.gfa_layer_weights(config)  # One weight >= 0 per layer, or ().


def _tap_names(model, image_shape) -> list[str]:
  """The names of the layer inputs a model exposes to GFA (``penalty.zero_taps``' keys)."""
  params, state = jax.eval_shape(
      lambda: checkpoints.init_variables(model, jax.random.key(0), image_shape))
  x = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
  return sorted(penalty.zero_taps(model.apply, {"params": params, **state}, x))

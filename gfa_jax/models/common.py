"""What the models share: input normalisation, the common fields, pooling, and the BatchNorm
and activation layers of the torch-layout models."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 as reshape + max.

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``; its gradient is a cheap elementwise mask
  instead of XLA's select-and-scatter, which is slow on CPU (and GFA differentiates it twice).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))



def float32_out(h: jax.Array) -> jax.Array:
  """``h`` as float32. A layer computing in bfloat16 (a model's ``dtype``) hands float32 on,
  so the activations, GFA's taps and cosines and the loss stay float32: only the convolutions
  and matmuls round. A float32 ``h`` is returned as it is (the default path is unchanged)."""
  return h if h.dtype == jnp.float32 else h.astype(jnp.float32)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(x - mean) / std per channel; one value applies to every channel. Refuses a channel
  count the statistics were not made for (3-channel CIFAR statistics on grey images would
  broadcast into three copies of each pixel)."""
  for stats in (mean, std):
    if len(stats) not in (1, x.shape[-1]):
      raise ValueError(f"normalisation statistics {tuple(stats)} are for {len(stats)} "
                       f"channels, the images have {x.shape[-1]}; set the model's mean and std "
                       f"(--config.model.mean / std) to {x.shape[-1]} values or one.")
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class _ImageModel(nn.Module):
  """The fields the convolutional models share: classes, the input normalisation, and how
  their convolutions differentiate."""

  num_classes: int = 10
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)
  # Convolutions through ``conv_same``: input gradients inside XLA CPU loops (attacks, PGD-AT)
  # run 3-4x faster, and reverse mode of any order works, but forward mode (``jax.jvp``,
  # ``jax.hessian``) does not. False gives lax's own convolution (same parameters and values).
  explicit_conv_vjp: bool = True


# torch.nn.BatchNorm2d's defaults: eps 1e-5, momentum 0.1 on the NEW batch (Flax's momentum
# weighs the OLD running average, so 0.9).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(name: str, train: bool) -> nn.BatchNorm:
  """torch's ``BatchNorm2d`` (eps 1e-5, momentum 0.1): batch statistics when ``train`` (the
  caller then passes ``mutable=["batch_stats"]``), the running ones otherwise."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      name=name)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "swish": nn.silu}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called ``name`` (relu, or swish = x * sigmoid(x))."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def maybe_normalize(x: jax.Array, mean: Sequence[float] | None,
                    std: Sequence[float] | None) -> jax.Array:
  """``normalize(x, mean, std)``, or ``x`` itself when both are None (the torch code bases that
  feed [0, 1] images as they are)."""
  if (mean is None) != (std is None):
    raise ValueError("set both mean and std of the model, or neither")
  return x if mean is None else normalize(x, mean, std)

"""Models. Each takes images in [0, 1] (NHWC) and returns logits.

Normalisation happens inside the model, so attacks and epsilons always live in [0, 1] pixel
space. Every layer input goes through ``penalty.tap`` under the name ``layer<i>`` (``layer0``
is the normalised image the first layer sees): that is all a model needs for GFA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gfa_jax.penalty import tap


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 as reshape + max.

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``; its gradient is a cheap elementwise mask
  instead of XLA's select-and-scatter, which is slow on CPU (and GFA differentiates it twice).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class SmallCNN(nn.Module):
  """The paper's CNN: 3 x (Conv3x3 SAME, ReLU, 2x2 max-pool), Dense 256, ReLU, Dense.

  620,362 parameters for 32x32x3 inputs and 10 classes. The default mean/std of 0.5 maps
  [0, 1] to [-1, 1], the scaling the paper fed (and aligned) at the first layer.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 128)
  hidden: int = 256
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    for i, width in enumerate(self.features):
      h = tap(self, f"layer{i}", h)
      h = max_pool_2x2(nn.relu(nn.Conv(width, (3, 3), padding="SAME")(h)))
    h = h.reshape(h.shape[0], -1)
    h = tap(self, f"layer{len(self.features)}", h)
    h = nn.relu(nn.Dense(self.hidden)(h))
    h = tap(self, f"layer{len(self.features) + 1}", h)
    return nn.Dense(self.num_classes)(h)


class MLP(nn.Module):
  """A multilayer perceptron (three hidden layers by default) for quick sanity runs."""

  num_classes: int = 10
  hidden: Sequence[int] = (512, 256, 128)
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      h = tap(self, f"layer{i}", h)
      h = nn.relu(nn.Dense(width)(h))
    h = tap(self, f"layer{len(self.hidden)}", h)
    return nn.Dense(self.num_classes)(h)


MODELS = {"small_cnn": SmallCNN, "mlp": MLP}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model from its name and keyword arguments (as stored in configs)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return MODELS[name](**kwargs)


def init_params(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> Any:
  """The ``'params'`` collection of ``model`` for images of ``image_shape`` (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]

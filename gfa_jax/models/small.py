"""The small models: the paper's CNN and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from gfa_jax.models.common import _ImageModel, float32_out, max_pool_2x2, normalize
from gfa_jax.models.conv import conv_same_for_flax
from gfa_jax.penalty import tap


class SmallCNN(_ImageModel):
  """The paper's CNN: 3 x (Conv3x3 SAME, ReLU, 2x2 max-pool), Dense 256, ReLU, Dense.

  620,362 parameters for 32x32x3 inputs and 10 classes. The default mean/std of 0.5 maps
  [0, 1] to [-1, 1], the scaling the paper fed (and aligned) at the first layer.
  """

  features: Sequence[int] = (32, 64, 128)
  hidden: int = 256
  # Where the convolutions and matmuls compute: None (float32, as the parameters) or
  # "bfloat16" (inputs and kernels cast down, outputs back to float32; the parameters stay
  # float32). train_lib sets it from config.compute_dtype; evaluation and attacks use None.
  dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    conv_fn = conv_same_for_flax if self.explicit_conv_vjp else None
    for i, width in enumerate(self.features):
      h = tap(self, f"layer{i}", h)
      conv = nn.Conv(width, (3, 3), padding="SAME", conv_general_dilated=conv_fn,
                     dtype=self.dtype)
      h = max_pool_2x2(nn.relu(float32_out(conv(h))))
    h = h.reshape(h.shape[0], -1)
    h = tap(self, f"layer{len(self.features)}", h)
    h = nn.relu(float32_out(nn.Dense(self.hidden, dtype=self.dtype)(h)))
    h = tap(self, f"layer{len(self.features) + 1}", h)
    return float32_out(nn.Dense(self.num_classes, dtype=self.dtype)(h))


class MLP(nn.Module):
  """A multilayer perceptron (three hidden layers by default) for quick sanity runs."""

  num_classes: int = 10
  hidden: Sequence[int] = (512, 256, 128)
  mean: Sequence[float] = (0.5,)  # One value for every channel: CIFAR-10 and Fashion-MNIST.
  std: Sequence[float] = (0.5,)
  # Where the matmuls compute: None (float32, as the parameters) or
  # "bfloat16" (inputs and kernels cast down, outputs back to float32; the parameters stay
  # float32). train_lib sets it from config.compute_dtype; evaluation and attacks use None.
  dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      h = tap(self, f"layer{i}", h)
      h = nn.relu(float32_out(nn.Dense(width, dtype=self.dtype)(h)))
    h = tap(self, f"layer{len(self.hidden)}", h)
    return float32_out(nn.Dense(self.num_classes, dtype=self.dtype)(h))

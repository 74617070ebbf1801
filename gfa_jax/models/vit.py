"""A small Vision Transformer."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gfa_jax.models.common import normalize
from gfa_jax.penalty import tap


class TransformerBlock(nn.Module):
  """Pre-LayerNorm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(h)))
    return x + h


class ViT(nn.Module):
  """A small Vision Transformer for 32x32 images.

  4x4 patches (64 tokens), each flattened and projected to ``width`` (128), plus a learned
  position embedding; ``depth`` (4) pre-LN blocks with ``num_heads`` (4) heads and an MLP of
  ``mlp_dim`` (256); final LayerNorm, mean over tokens, Dense. 545,930 parameters with the
  defaults for 32x32x3 inputs and 10 classes. No class token, no dropout. LayerNorm and
  attention act within one sample, so GFA's per-sample cosine is well defined.

  Taps: ``layer0`` is the normalised image (as in ``SmallCNN``), ``layer1`` the tokens the
  first block sees (patch embedding + position), ``layer2`` .. ``layer<depth>`` the inputs of
  the other blocks, ``layer<depth+1>`` the pooled features the classifier sees.
  """

  num_classes: int = 10
  patch_size: int = 4
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    h = tap(self, "layer0", h)
    b, height, width, c = h.shape
    p = self.patch_size
    patches = h.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (height // p) * (width // p), p * p * c)
    h = nn.Dense(self.width, name="patch_embedding")(patches)
    position = self.param("position_embedding", nn.initializers.normal(0.02),
                          (1, *h.shape[1:]), h.dtype)
    h = h + position
    for i in range(self.depth):
      h = tap(self, f"layer{i + 1}", h)
      h = TransformerBlock(self.num_heads, self.mlp_dim)(h)
    h = jnp.mean(nn.LayerNorm()(h), axis=1)
    h = tap(self, f"layer{self.depth + 1}", h)
    return nn.Dense(self.num_classes)(h)

"""A small Vision Transformer."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gfa_jax.models.common import float32_out, normalize
from gfa_jax.penalty import tap


class TransformerBlock(nn.Module):
  """Pre-LayerNorm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

  num_heads: int
  mlp_dim: int
  dtype: str | None = None  # Of the matmuls (ViT.dtype).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # In bfloat16 the attention's softmax still runs in float32 (its logits' differences
    # matter); None leaves Flax's default call as it was.
    low = {"dtype": self.dtype, "force_fp32_for_softmax": True} if self.dtype else {}
    h = nn.LayerNorm()(x)
    x = x + float32_out(nn.MultiHeadDotProductAttention(num_heads=self.num_heads, **low)(h, h))
    h = nn.LayerNorm()(x)
    out = nn.Dense(x.shape[-1], dtype=self.dtype)  # Built first: named Dense_0, as before.
    h = float32_out(nn.Dense(self.mlp_dim, dtype=self.dtype)(h))
    h = float32_out(out(nn.gelu(h)))
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
  # Where the matmuls compute: None (float32, as the parameters) or "bfloat16" (outputs back
  # to float32; LayerNorm, GELU and the attention's softmax stay float32).
  dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    h = tap(self, "layer0", h)
    b, height, width, c = h.shape
    p = self.patch_size
    patches = h.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (height // p) * (width // p), p * p * c)
    h = float32_out(nn.Dense(self.width, name="patch_embedding", dtype=self.dtype)(patches))
    position = self.param("position_embedding", nn.initializers.normal(0.02),
                          (1, *h.shape[1:]), h.dtype)
    h = h + position
    for i in range(self.depth):
      h = tap(self, f"layer{i + 1}", h)
      h = TransformerBlock(self.num_heads, self.mlp_dim, self.dtype)(h)
    h = jnp.mean(nn.LayerNorm()(h), axis=1)
    h = tap(self, f"layer{self.depth + 1}", h)
    return float32_out(nn.Dense(self.num_classes, dtype=self.dtype)(h))

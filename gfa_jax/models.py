"""Models. Each takes images in [0, 1] (NHWC) and returns logits.

Normalisation happens inside the model, so attacks and epsilons always live in [0, 1] pixel
space. Every layer input goes through ``penalty.tap`` under the name ``layer<i>`` (``layer0``
is the normalised image the first layer sees; for ResNet20 and ViT ``layer<i>``, i >= 1, is
the input of residual / transformer block i): that is all a model needs for GFA.

Registry (``create_model``; ``from_config`` for a config's ``model`` section): small_cnn (the
paper's CNN), mlp, resnet20, vit. No model may mix the samples of a batch (no BatchNorm): GFA's
cosine is per sample.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gfa_jax.penalty import tap


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 as reshape + max.

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``; its gradient is a cheap elementwise mask
  instead of XLA's select-and-scatter, which is slow on CPU (and GFA differentiates it twice).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# --------------------------------------------------------------------------------------------
# Convolution with an explicit VJP.
#
# JAX's transpose rule computes a convolution's input gradient as a convolution with the kernel
# reversed and read in (out, in) order. XLA's CPU backend runs that form on a slow generic loop
# whenever it does not lay the kernel out anew first, as inside the attacks' while loops (PGD
# on SmallCNN ran 3x slower). ``conv_same`` writes its input gradient as an ordinary forward
# convolution with the flipped, transposed kernel, and its kernel gradient as a function whose
# VJP is again made of ``conv_same``, so derivatives of every order (GFA takes two, an attack
# on a GFA objective three) stay in the form XLA runs fast. Values and derivatives equal
# ``lax.conv_general_dilated``'s up to float rounding. A custom VJP rules out forward mode
# (``jax.jvp``): models offer lax's convolution as well (``SmallCNN.explicit_conv_vjp``).

_NHWC = ("NHWC", "HWIO", "NHWC")


def _transposed(kernel: jax.Array) -> jax.Array:
  """The kernel whose 'SAME' convolution is the transpose of ``kernel``'s (odd sizes)."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution of NHWC ``x`` with an odd-sized HWIO ``kernel`` -> NHWC."""
  # Fewer than 4 channels in or out (an RGB image, its input gradient) run several times
  # slower on XLA CPU than 4; zero channels change no value.
  cin, cout = kernel.shape[2:]
  pad_in, pad_out = max(4 - cin, 0), max(4 - cout, 0)
  if pad_in or pad_out:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad_in)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, pad_in), (0, pad_out)))
  y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)
  return y[..., :cout]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_gradient(x: jax.Array, g: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``d <conv_same(x, kernel), g> / d kernel`` for a kernel of spatial ``size`` (HWIO).

  A convolution over the batch: input channels act as its batch, the image as its window.
  """
  padding = [(k // 2, k // 2) for k in size]
  return lax.conv_general_dilated(x, g, (1, 1), padding,
                                  dimension_numbers=("CHWN", "IHWO", "HWNC"))


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, g):
  x, kernel = residuals
  return conv_same(g, _transposed(kernel)), _kernel_gradient(x, g, kernel.shape[:2])


def _kernel_gradient_fwd(x, g, size):
  return _kernel_gradient(x, g, size), (x, g)


def _kernel_gradient_bwd(size, residuals, kernel_cotangent):
  x, g = residuals
  return conv_same(g, _transposed(kernel_cotangent)), conv_same(x, kernel_cotangent)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)
_kernel_gradient.defvjp(_kernel_gradient_fwd, _kernel_gradient_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same_subsampled(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """``conv_same(x, kernel)[:, ::stride, ::stride]``: torch's ``Conv2d(stride,
  padding=k // 2)``, whose windows are the 'SAME' ones centred on every stride-th pixel.

  The forward pass is one strided convolution, 1/stride^2 of the FLOPs of convolving at
  stride 1 and subsampling (done that way, a ResNet-18's three stride-2 3x3 convolutions made
  23 % of the multiplies of its forward pass, every result thrown away). The input gradient is
  the transposed convolution split by output phase (``_phase_input_gradient``): stride^2 small
  forward convolutions, again no multiply by an inserted zero. The kernel gradient is
  ``conv_same``'s on the stride-1 grid.
  """
  padding = [(k // 2, k // 2) for k in kernel.shape[:2]]
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_NHWC)


def _phase_taps(size: int, kernel_size: int, stride: int, phase: int) -> tuple[list, tuple]:
  """For input positions ``stride * i + phase`` of a stride-``stride``, padding
  ``kernel_size // 2`` convolution over ``size`` positions: the kernel taps that reach them
  (none: []), in the order a forward convolution over the output gradient reads them, and that
  convolution's padding. Tap p reaches position stride * i + phase from output i + d,
  d = (phase + kernel_size // 2 - p) / stride."""
  half = kernel_size // 2
  taps = list(range((phase + half) % stride, kernel_size, stride))[::-1]
  if not taps:
    return [], (0, 0)
  first = (phase + half - taps[0]) // stride  # the smallest offset d read
  outputs, inputs = -(-(size - phase) // stride), -(-size // stride)
  return taps, (-first, outputs - inputs + first + len(taps) - 1)


def _phase_input_gradient(g: jax.Array, kernel: jax.Array, size: tuple[int, int],
                          stride: int) -> jax.Array:
  """``d <conv_same_subsampled(x, kernel), g> / d x`` for ``x`` of spatial ``size``.

  Input pixel ``(stride * i + a, stride * j + b)`` receives only the taps of phase ``(a, b)``;
  each phase is one forward convolution of ``g`` with those taps, transposed (the form XLA CPU
  runs fast, as ``conv_same``'s input gradient), and the phases interleave into the image.
  """
  rows = []
  for a in range(stride):
    row = []
    for b in range(stride):
      (taps_h, pad_h), (taps_w, pad_w) = (_phase_taps(n, k, stride, p) for n, k, p in
                                          zip(size, kernel.shape[:2], (a, b)))
      if not (taps_h and taps_w):  # no tap reaches this phase (a kernel smaller than stride)
        row.append(jnp.zeros((*g.shape[:3], kernel.shape[2]), g.dtype))
        continue
      # taps are every stride-th index, descending: a strided slice, flipped
      part = jnp.flip(kernel[taps_h[-1]::stride, taps_w[-1]::stride], (0, 1)).swapaxes(2, 3)
      # Padding as its own op (a negative one crops): with the padding inside the convolution,
      # second derivatives came out wrong where it was negative (stride 3 in the tests).
      padded = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (*pad_h, 0), (*pad_w, 0),
                                                   (0, 0, 0)])
      row.append(lax.conv_general_dilated(padded, part, (1, 1), "VALID",
                                          dimension_numbers=_NHWC))
    rows.append(jnp.stack(row, axis=3))  # [B, H / s, W / s, s (b), C]
  phases = jnp.stack(rows, axis=2)  # [B, H / s, s (a), W / s, s (b), C]
  return phases.reshape(g.shape[0], *size, kernel.shape[2])


def _conv_same_subsampled_fwd(x, kernel, stride):
  return conv_same_subsampled(x, kernel, stride), (x, kernel)


def _conv_same_subsampled_bwd(stride, residuals, g):
  x, kernel = residuals
  # The cotangent of the stride-1 output: g at the kept positions, zeros between and after.
  spread = [(0, 0, 0)] + [(0, n - 1 - (m - 1) * stride, stride - 1)
                          for n, m in zip(x.shape[1:3], g.shape[1:3])] + [(0, 0, 0)]
  g_full = lax.pad(g, jnp.zeros((), g.dtype), spread)
  if any(n % stride for n in x.shape[1:3]):  # the phases would not tile the image
    return _conv_same_bwd(residuals, g_full)
  return (_phase_input_gradient(g, kernel, x.shape[1:3], stride),
          _kernel_gradient(x, g_full, kernel.shape[:2]))


conv_same_subsampled.defvjp(_conv_same_subsampled_fwd, _conv_same_subsampled_bwd)


def conv_same_for_flax(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count, precision,
                       subsample: int = 1) -> jax.Array:
  """``conv_same`` behind ``nn.Conv(..., conv_general_dilated=...)``'s calling convention.

  ``functools.partial(conv_same_for_flax, subsample=s)`` behind a stride-1 'SAME' ``nn.Conv``
  gives ``conv_same_subsampled``, torch's stride-s convolution with padding k // 2 (flax's own
  'SAME' at stride 2 pads (0, 1) instead, so that is refused here).
  """
  plain = (tuple(window_strides) == (1, 1) and padding == "SAME"
           and tuple(lhs_dilation) == tuple(rhs_dilation) == (1, 1)
           and feature_group_count == 1 and precision is None
           and all(k % 2 for k in rhs.shape[:2])
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    raise ValueError("conv_same_for_flax serves only stride-1 'SAME' NHWC convolutions with odd "
                     "kernels, no dilation or groups; use nn.Conv's default for others")
  return conv_same(lhs, rhs) if subsample == 1 else conv_same_subsampled(lhs, rhs, subsample)


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


class SmallCNN(_ImageModel):
  """The paper's CNN: 3 x (Conv3x3 SAME, ReLU, 2x2 max-pool), Dense 256, ReLU, Dense.

  620,362 parameters for 32x32x3 inputs and 10 classes. The default mean/std of 0.5 maps
  [0, 1] to [-1, 1], the scaling the paper fed (and aligned) at the first layer.
  """

  features: Sequence[int] = (32, 64, 128)
  hidden: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    conv_fn = conv_same_for_flax if self.explicit_conv_vjp else None
    for i, width in enumerate(self.features):
      h = tap(self, f"layer{i}", h)
      conv = nn.Conv(width, (3, 3), padding="SAME", conv_general_dilated=conv_fn)
      h = max_pool_2x2(nn.relu(conv(h)))
    h = h.reshape(h.shape[0], -1)
    h = tap(self, f"layer{len(self.features)}", h)
    h = nn.relu(nn.Dense(self.hidden)(h))
    h = tap(self, f"layer{len(self.features) + 1}", h)
    return nn.Dense(self.num_classes)(h)


class MLP(nn.Module):
  """A multilayer perceptron (three hidden layers by default) for quick sanity runs."""

  num_classes: int = 10
  hidden: Sequence[int] = (512, 256, 128)
  mean: Sequence[float] = (0.5,)  # One value for every channel: CIFAR-10 and Fashion-MNIST.
  std: Sequence[float] = (0.5,)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      h = tap(self, f"layer{i}", h)
      h = nn.relu(nn.Dense(width)(h))
    h = tap(self, f"layer{len(self.hidden)}", h)
    return nn.Dense(self.num_classes)(h)


# --------------------------------------------------------------------------------------------
# Larger models. GFA's cosine is per sample (dL/dh[i] against h[i]), so no layer may mix the
# samples of a batch: BatchNorm would make dL/dh[i] depend on every other sample (and train and
# eval modes differ). Both models below normalise each sample on its own (GroupNorm, LayerNorm).


def conv3x3(features: int, strides: int = 1, explicit_conv_vjp: bool = True) -> Any:
  """A bias-free 3x3 convolution with padding 1 (PyTorch's ``padding=1``), stride 1 or 2.

  With ``explicit_conv_vjp`` it runs through ``conv_same``, stride 2 through
  ``conv_same_subsampled`` (same values as lax's strided convolution with padding
  ((1, 1), (1, 1)), which ``explicit_conv_vjp=False`` uses; conv_same's derivatives).
  """
  init = nn.initializers.he_normal()
  if not explicit_conv_vjp:
    return nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)), use_bias=False,
                   kernel_init=init)
  return nn.Conv(features, (3, 3), padding="SAME", use_bias=False, kernel_init=init,
                 conv_general_dilated=functools.partial(conv_same_for_flax, subsample=strides))


def group_norm(channels: int) -> nn.GroupNorm:
  """Per-sample normalisation over groups of channels (8 groups, fewer for narrow maps)."""
  return nn.GroupNorm(num_groups=min(8, channels))


class BasicBlock(nn.Module):
  """He et al.'s basic block: conv-norm-ReLU-conv-norm, plus the shortcut, then ReLU.

  The shortcut is the identity, or He et al.'s option A where the block changes the shape:
  subsample by ``strides`` and zero-pad the new channels. Option A adds no parameters (ResNet20
  keeps its 0.27 M) and is what the paper used on CIFAR.
  """

  features: int
  strides: int = 1
  explicit_conv_vjp: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = conv3x3(self.features, self.strides, self.explicit_conv_vjp)(x)
    h = nn.relu(group_norm(self.features)(h))
    h = conv3x3(self.features, 1, self.explicit_conv_vjp)(h)
    h = group_norm(self.features)(h)
    shortcut = x[:, ::self.strides, ::self.strides, :]
    extra = self.features - x.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(h + shortcut)


class ResNet20(_ImageModel):
  """He et al. (2016)'s CIFAR ResNet-20, with GroupNorm in place of BatchNorm.

  Conv3x3 16, GroupNorm, ReLU; three stages of three ``BasicBlock``s with 16, 32 and 64
  channels (stride 2 at the start of the second and third); global average pool; Dense.
  269,722 parameters for 32x32x3 inputs and 10 classes.

  GroupNorm, not BatchNorm: GFA compares dL/dh and h per sample, and BatchNorm mixes the
  samples of a batch (each sample's output, hence its gradient, would depend on the others,
  and train and eval would compute different functions). GroupNorm normalises each sample by
  itself (8 groups of channels), so sample i's logits depend on image i alone.

  Taps: ``layer0`` is the normalised image the first convolution sees (as in ``SmallCNN``),
  ``layer1`` .. ``layer9`` the inputs of the nine residual blocks, ``layer10`` the pooled
  features the classifier sees. Note: the first convolution has no bias and GroupNorm
  follows it, so the loss is invariant to rescaling ``layer0``, and GFA's cosine there is 0
  by construction (<dL/dh, h> = 0 for a 0-homogeneous loss; docs/results.md).
  """

  stage_features: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    h = tap(self, "layer0", h)
    h = conv3x3(self.stage_features[0], 1, self.explicit_conv_vjp)(h)
    h = nn.relu(group_norm(self.stage_features[0])(h))
    layer = 1
    for stage, width in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        h = tap(self, f"layer{layer}", h)
        strides = 2 if stage > 0 and block == 0 else 1
        h = BasicBlock(width, strides, self.explicit_conv_vjp)(h)
        layer += 1
    h = jnp.mean(h, axis=(1, 2))
    h = tap(self, f"layer{layer}", h)
    return nn.Dense(self.num_classes)(h)


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


MODELS = {"small_cnn": SmallCNN, "mlp": MLP, "resnet20": ResNet20, "vit": ViT}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model from its name and keyword arguments (as stored in configs)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  fields = {f.name for f in dataclasses.fields(MODELS[name]) if f.init} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"model {name!r} has no field(s) {unknown} (from config.model); its fields "
                     f"are {sorted(fields)}. Drop them, e.g. start from a config written for "
                     f"{name!r}.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return MODELS[name](**kwargs)


def init_params(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> Any:
  """The ``'params'`` collection of ``model`` for images of ``image_shape`` (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]


def from_config(model_config: Mapping[str, Any]) -> nn.Module:
  """The model a config's ``model`` section (ConfigDict or dict) names.

  Equal sections give the *same* instance, so its ``apply`` is one function and everything
  jitted over it (attacks bound with ``batching.bind``, eval steps) compiles once for every
  checkpoint of that architecture. The input shape is not part of a Flax module: it comes from
  the data, at ``init_params`` / ``abstract_params``.
  """
  return _from_json(json.dumps(dict(model_config), sort_keys=True, default=list))


@functools.lru_cache(maxsize=None)
def _from_json(text: str) -> nn.Module:
  model_config = json.loads(text)
  return create_model(model_config.pop("name"), **model_config)


def abstract_params(model: nn.Module, image_shape: Sequence[int]) -> Any:
  """Shapes and dtypes (ShapeDtypeStructs) of the model's parameters for images of
  ``image_shape`` (H, W, C), computed without FLOPs: the restore target of a checkpoint."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_shape))

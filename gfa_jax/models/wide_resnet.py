"""WideResNets in RobustBench's two layouts, the architectures of most of its CIFAR-10 entries:
the classic ``WideResNet`` (wide_resnet.py, after TRADES: WRN-28-10, 34-10, 34-20, 70-16) and
DeepMind's ``DMWideResNet`` (dm_wide_resnet.py: swish, CIFAR-10 mean/std inside, stride-2
convolutions padded (0, 1)).

Both: depth 6n + 4 (n blocks per group), a 3x3 stem of 16 channels, three groups of
pre-activation blocks with 16k, 32k and 64k channels (k = ``width``; stride 2 at the start of
the second and third), a final BN-activation, global average pool (torch's 8x8 pool of the 8x8
map), linear head. BatchNorm as torch's (``train`` picks batch or running statistics; see
``models.resnet`` on GFA and BatchNorm). Flax module names are torch's module paths with "."
written "__" (``block1__layer__0`` is torch's ``block1.layer.0``). Taps: ``layer0`` the image
the stem sees, ``layer1`` .. ``layer<3n>`` the inputs of the blocks, ``layer<3n+1>`` the pooled
features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gfa_jax.models.common import activation, batch_norm, maybe_normalize
from gfa_jax.models.conv import torch_conv
from gfa_jax.models.resnet import CIFAR10_MEAN, CIFAR10_STD
from gfa_jax.penalty import tap


def blocks_per_group(depth: int) -> int:
  """n of a WideResNet of ``depth`` = 6n + 4; refuses other depths."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f"a WideResNet's depth is 6n + 4 (10, 16, 22, 28, 34, 40, ..., 70), got "
                     f"{depth}")
  return (depth - 4) // 6


def group_widths(width: int) -> tuple[int, int, int, int]:
  """Channels of the stem and of the three groups of a WideResNet widened by ``width``."""
  if width < 1:
    raise ValueError(f"a WideResNet's width (widen factor) is a positive integer, got {width}")
  return 16, 16 * width, 32 * width, 64 * width


class Layout(NamedTuple):
  """The torch module names of one code base's WideResNet (Flax names are these with "."
  written "__"), and its stride-2 padding. ``block`` is formatted with the group counted from
  1 (``g1``) or 0 (``g0``) and the block's index ``i``."""
  stem: str
  block: str
  bn_0: str
  conv_0: str
  bn_1: str
  conv_1: str
  shortcut: str
  final_bn: str
  head: str
  pad_end: bool  # a stride-2 conv_0 pads (0, 1), TF's "SAME", instead of torch's (1, 1)


CLASSIC = Layout("conv1", "block{g1}__layer__{i}", "bn1", "conv1", "bn2", "conv2",
                 "convShortcut", "bn1", "fc", pad_end=False)
DEEPMIND = Layout("init_conv", "layer__{g0}__block__{i}", "batchnorm_0", "conv_0",
                  "batchnorm_1", "conv_1", "shortcut", "batchnorm", "logits", pad_end=True)


class WideBlock(nn.Module):
  """The pre-activation block of both layouts: a = act(bn_0(x)); out = conv_1(act(bn_1(
  conv_0(a)))). Where the channel count changes, the shortcut is a 1x1 convolution of a; else
  it is x itself."""
  features: int
  stride: int
  activation: str = "relu"
  layout: Layout = CLASSIC

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    names, act = self.layout, activation(self.activation)
    a = act(batch_norm(names.bn_0, train)(x))
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = torch_conv(self.features, 1, self.stride, names.shortcut)(a)
    out = torch_conv(self.features, 3, self.stride, names.conv_0,
                     pad_end=names.pad_end and self.stride == 2)(a)
    out = act(batch_norm(names.bn_1, train)(out))
    return torch_conv(self.features, 3, 1, names.conv_1)(out) + shortcut


class WideResNet(nn.Module):
  """RobustBench's classic ``WideResNet(depth, widen_factor=width)`` (keys ``conv1``,
  ``block1.layer.0.bn1`` ..., ``bn1``, ``fc``). ReLU and no normalisation, as published
  (``activation``, ``mean``/``std`` are there for training variants). ``layout`` names the
  modules (``DMWideResNet`` is this network in DeepMind's layout)."""
  depth: int = 28
  width: int = 10
  activation: str = "relu"
  num_classes: int = 10
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  layout: Layout = CLASSIC

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    n, widths, names = blocks_per_group(self.depth), group_widths(self.width), self.layout
    x = tap(self, "layer0", maybe_normalize(x, self.mean, self.std))
    out = torch_conv(widths[0], 3, 1, names.stem)(x)
    layer = 1
    for group in range(3):
      for index in range(n):
        out = tap(self, f"layer{layer}", out)
        stride = 2 if group and not index else 1
        out = WideBlock(widths[group + 1], stride, self.activation, names,
                        name=names.block.format(g0=group, g1=group + 1, i=index))(out, train)
        layer += 1
    out = activation(self.activation)(batch_norm(names.final_bn, train)(out))
    out = tap(self, f"layer{layer}", jnp.mean(out, axis=(1, 2)))
    return nn.Dense(self.num_classes, name=names.head)(out)


class DMWideResNet(WideResNet):
  """DeepMind's ``DMWideResNet(depth, width)`` (keys ``init_conv``,
  ``layer.0.block.0.batchnorm_0`` ..., ``batchnorm``, ``logits``; stride-2 ``conv_0`` padded
  (0, 1)): swish by default (most RobustBench entries; ``activation="relu"`` for the others),
  the CIFAR-10 mean/std applied inside (not part of the state_dict; None for neither)."""
  activation: str = "swish"
  mean: Sequence[float] | None = CIFAR10_MEAN
  std: Sequence[float] | None = CIFAR10_STD
  layout: Layout = DEEPMIND

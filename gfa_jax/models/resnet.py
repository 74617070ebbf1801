"""ResNets: He et al.'s CIFAR ResNet-20 with GroupNorm (the bundled one), and the BatchNorm
ResNet-18s of the torch code bases (Kuang Liu's, RobustBench's PreActResNet18, DeepMind's
DMPreActResNet), whose parameter names follow the torch ``state_dict`` keys.

GFA's cosine is per sample (dL/dh[i] against h[i]), so a layer that mixes the samples of a
batch makes it ill defined: ResNet20 normalises each sample on its own (GroupNorm). The
BatchNorm models mix samples only when ``train=True`` (batch statistics); in inference mode
(``train=False``, the running statistics, as torch's ``eval()``) sample i's logits depend on
image i alone. Their Flax module names are torch's module paths with "." written "__"
(``layer1__0`` is torch's ``layer1.0``), which is how ``gfa_jax.torch_import`` maps keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gfa_jax.models.common import (_ImageModel, activation, batch_norm, float32_out,
                                   maybe_normalize, normalize)
from gfa_jax.models.conv import conv3x3, torch_conv
from gfa_jax.penalty import tap

# DeepMind's and RobustBench's CIFAR-10 statistics (dm_wide_resnet.py), applied inside their
# models.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


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
  dtype: str | None = None  # Of the convolutions (ResNet20.dtype).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = float32_out(conv3x3(self.features, self.strides, self.explicit_conv_vjp, self.dtype)(x))
    h = nn.relu(group_norm(self.features)(h))
    h = float32_out(conv3x3(self.features, 1, self.explicit_conv_vjp, self.dtype)(h))
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
  # Where the convolutions and matmuls compute: None (float32, as the parameters) or
  # "bfloat16" (outputs back to float32; GroupNorm and the shortcut stay float32).
  dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = normalize(x, self.mean, self.std)
    h = tap(self, "layer0", h)
    h = float32_out(conv3x3(self.stage_features[0], 1, self.explicit_conv_vjp, self.dtype)(h))
    h = nn.relu(group_norm(self.stage_features[0])(h))
    layer = 1
    for stage, width in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        h = tap(self, f"layer{layer}", h)
        strides = 2 if stage > 0 and block == 0 else 1
        h = BasicBlock(width, strides, self.explicit_conv_vjp, self.dtype)(h)
        layer += 1
    h = jnp.mean(h, axis=(1, 2))
    h = tap(self, f"layer{layer}", h)
    return float32_out(nn.Dense(self.num_classes, dtype=self.dtype)(h))


class TorchBasicBlock(nn.Module):
  """Kuang Liu's post-activation block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)),
  the shortcut a 1x1 conv + BN (keys ``shortcut.0``, ``shortcut.1``) where the shape changes."""
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = nn.relu(batch_norm("bn1", train)(torch_conv(self.features, 3, self.stride, "conv1")(x)))
    out = batch_norm("bn2", train)(torch_conv(self.features, 3, 1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = torch_conv(self.features, 1, self.stride, "shortcut__0")(x)
      x = batch_norm("shortcut__1", train)(x)
    return nn.relu(out + x)


class PreActBlock(nn.Module):
  """RobustBench's pre-activation block: conv2(relu(bn2(conv1(a)))) + shortcut, a =
  relu(bn1(x)); the shortcut a bare 1x1 conv of a (key ``shortcut.0``) where the shape
  changes, else x."""
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = nn.relu(batch_norm("bn1", train)(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = torch_conv(self.features, 1, self.stride, "shortcut__0")(out)
    out = torch_conv(self.features, 3, self.stride, "conv1")(out)
    out = torch_conv(self.features, 3, 1, "conv2")(nn.relu(batch_norm("bn2", train)(out)))
    return out + shortcut


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs in two torch layouts: Kuang Liu's (``pytorch-cifar``, also
  pyautoattack's examples/resnet.py: conv-BN-ReLU stem, post-activation blocks, key
  ``linear``) or, with ``preact``, RobustBench's ``PreActResNet18`` (bare conv stem,
  pre-activation blocks, a final BN-ReLU, key ``bn``).

  Four stages of two blocks with ``width`` x (1, 2, 4, 8) channels (64: the published models;
  narrower ones keep the key layout, for tests), global average pool (torch's 4x4 pool of the
  4x4 map), linear head. No normalisation unless ``mean``/``std`` are set (both code bases
  feed [0, 1] images). Taps: ``layer0`` the image the stem sees, ``layer1`` .. ``layer8`` the
  inputs of the eight blocks, ``layer9`` the pooled features.
  """
  num_classes: int = 10
  preact: bool = False
  width: int = 64
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = tap(self, "layer0", maybe_normalize(x, self.mean, self.std))
    out = torch_conv(self.width, 3, 1, "conv1")(x)
    if not self.preact:
      out = nn.relu(batch_norm("bn1", train)(out))
    block = PreActBlock if self.preact else TorchBasicBlock
    layer = 1
    for stage in range(4):
      for index in range(2):
        out = tap(self, f"layer{layer}", out)
        stride = 2 if stage and not index else 1
        out = block(self.width * 2 ** stage, stride, name=f"layer{stage + 1}__{index}")(
            out, train)
        layer += 1
    if self.preact:
      out = nn.relu(batch_norm("bn", train)(out))
    out = tap(self, f"layer{layer}", jnp.mean(out, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="linear")(out)


class PreActResNet18(ResNet18):
  """``ResNet18(preact=True)``: RobustBench's ``PreActResNet18`` (a registry name of its own)."""
  preact: bool = True


class DMPreActBlock(nn.Module):
  """DeepMind's ``_PreActBlock``: conv_2d_2(act(batchnorm_1(conv_2d_1(a)))) + shortcut, a =
  act(batchnorm_0(x)); the shortcut a 3x3 conv of x (not of a) where the shape changes.
  Stride-2 3x3 convolutions pad (0, 1) (``pad_end``), stride-1 ones 1 on every side."""
  features: int
  stride: int
  activation: str = "swish"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act, pad_end = activation(self.activation), self.stride == 2
    out = act(batch_norm("batchnorm_0", train)(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = torch_conv(self.features, 3, self.stride, "shortcut", pad_end=pad_end)(x)
    out = torch_conv(self.features, 3, self.stride, "conv_2d_1", pad_end=pad_end)(out)
    out = act(batch_norm("batchnorm_1", train)(out))
    return torch_conv(self.features, 3, 1, "conv_2d_2")(out) + shortcut


class DMPreActResNet(nn.Module):
  """DeepMind's ``DMPreActResNet`` (RobustBench's dm_wide_resnet.py / dm_rn.py): the CIFAR-10
  mean/std applied inside (not part of the state_dict), a bare conv stem ``conv_2d``, four
  stages ``layer_0`` .. ``layer_3`` of pre-activation blocks with ``width`` x (1, 2, 4, 8)
  channels (64 published), a final BN-activation, global average pool, head ``logits``.
  ``depth`` 18 (2, 2, 2, 2 blocks) or 34 (3, 4, 6, 3); ``activation`` swish or relu. Taps:
  ``layer0`` the normalised image, then the block inputs, last the pooled features.
  """
  num_classes: int = 10
  depth: int = 18
  width: int = 64
  activation: str = "swish"
  mean: Sequence[float] | None = CIFAR10_MEAN
  std: Sequence[float] | None = CIFAR10_STD

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.get(self.depth)
    if blocks is None:
      raise ValueError(f"DMPreActResNet depth must be 18 or 34, got {self.depth}")
    x = tap(self, "layer0", maybe_normalize(x, self.mean, self.std))
    out = torch_conv(self.width, 3, 1, "conv_2d")(x)
    layer = 1
    for stage, count in enumerate(blocks):
      for index in range(count):
        out = tap(self, f"layer{layer}", out)
        stride = 2 if stage and not index else 1
        out = DMPreActBlock(self.width * 2 ** stage, stride, self.activation,
                            name=f"layer_{stage}__{index}")(out, train)
        layer += 1
    out = activation(self.activation)(batch_norm("batchnorm", train)(out))
    out = tap(self, f"layer{layer}", jnp.mean(out, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="logits")(out)

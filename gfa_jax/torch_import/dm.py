"""Torch import, DeepMind's family (RobustBench's dm_wide_resnet.py / dm_rn.py, Gowal et al.,
Rebuffi et al., Wang et al.): ``DMWideResNet`` as ``models.DMWideResNet`` (keys
``init_conv``, ``layer.0.block.0.batchnorm_0`` ..., ``batchnorm``, ``logits``) and
``DMPreActResNet`` as ``models.DMPreActResNet`` (``conv_2d``, ``layer_0.0.batchnorm_0`` ...).

Most entries use swish (``activation="swish"``, the default), some ReLU. The models apply the
CIFAR-10 mean/std themselves, as plain tensors outside the state_dict, so the twins do too by
default (pass the entry's own ``mean``/``std`` for CIFAR-100 statistics)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn

from gfa_jax import models
from gfa_jax.torch_import.reader import statistics


def dm_wide_resnet(*, depth: int, width: int, num_classes: int = 10, activation: str = "swish",
                   mean: Sequence[float] = models.CIFAR10_MEAN,
                   std: Sequence[float] = models.CIFAR10_STD) -> nn.Module:
  """The Flax twin of a ``DMWideResNet(depth=depth, width=width)`` checkpoint (overriding the
  arch's depth and width serves narrower test twins and other sizes)."""
  mean, std = statistics(mean, std)
  return models.DMWideResNet(depth=depth, width=width, activation=activation,
                             num_classes=num_classes, mean=mean, std=std)


def dm_preact_resnet(*, depth: int = 18, width: int = 64, num_classes: int = 10,
                     activation: str = "swish", mean: Sequence[float] = models.CIFAR10_MEAN,
                     std: Sequence[float] = models.CIFAR10_STD) -> nn.Module:
  """The Flax twin of a ``DMPreActResNet(depth=18)`` checkpoint (``width``, the first stage's
  channels, 64 published; narrower ones for tests)."""
  mean, std = statistics(mean, std)
  return models.DMPreActResNet(depth=depth, width=width, activation=activation,
                               num_classes=num_classes, mean=mean, std=std)


# The sizes of RobustBench's CIFAR-10 DMWideResNet entries.
ARCHS = {f"dm-wrn-{depth}-{width}": functools.partial(dm_wide_resnet, depth=depth, width=width)
         for depth, width in ((28, 10), (34, 10), (34, 20), (70, 16), (82, 8), (94, 16),
                              (106, 16))}
ARCHS["dm-preact-resnet18"] = dm_preact_resnet
IGNORE: tuple[str, ...] = ()

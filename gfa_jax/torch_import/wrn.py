"""Torch import, the classic WideResNet family: RobustBench's ``WideResNet`` (wide_resnet.py,
after TRADES), the architecture of most of its CIFAR-10 Linf entries, as
``models.WideResNet``. Keys ``conv1``, ``block1.layer.0.bn1`` ..., ``bn1``, ``fc``; the unused
``sub_block1`` some checkpoints carry (``WideResNet(sub_block1=True)`` builds it, ``forward``
never calls it) is ignored."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn

from gfa_jax import models
from gfa_jax.torch_import.reader import statistics


def wide_resnet(*, depth: int, width: int, num_classes: int = 10, activation: str = "relu",
                mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> nn.Module:
  """The Flax twin of a ``WideResNet(depth, widen_factor=width)`` checkpoint. The arch name
  sets depth and width (overriding them serves narrower test twins and other sizes); ReLU and
  no normalisation as published."""
  mean, std = statistics(mean, std)
  return models.WideResNet(depth=depth, width=width, activation=activation,
                           num_classes=num_classes, mean=mean, std=std)


ARCHS = {f"wrn-{depth}-{width}": functools.partial(wide_resnet, depth=depth, width=width)
         for depth, width in ((28, 10), (34, 10), (34, 15), (34, 20), (70, 16))}
IGNORE = ("sub_block1.",)

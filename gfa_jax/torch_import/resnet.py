"""Torch import, the ResNet family: Kuang Liu's ResNet-18 (``pytorch-cifar``, also
pyautoattack's examples/resnet.py), as ``models.ResNet18``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from gfa_jax import models
from gfa_jax.torch_import.reader import statistics


def resnet18(*, num_classes: int = 10, width: int = 64, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> nn.Module:
  """The Flax twin of the checkpoint (``width`` 64 published; narrower ones for tests). No
  normalisation unless ``mean``/``std`` are given (the code base feeds [0, 1] images)."""
  mean, std = statistics(mean, std)
  return models.ResNet18(num_classes=num_classes, width=width, mean=mean, std=std)


ARCHS = {"resnet18": resnet18}
IGNORE: tuple[str, ...] = ()

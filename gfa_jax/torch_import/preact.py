"""Torch import, the pre-activation ResNet family: RobustBench's ``PreActResNet18``
(pre-activation blocks, a final BN-ReLU under key ``bn``, the shortcut a bare 1x1 conv under
``shortcut.0``), as ``models.PreActResNet18``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from gfa_jax import models
from gfa_jax.torch_import.reader import statistics


def preact_resnet18(*, num_classes: int = 10, width: int = 64,
                    mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> nn.Module:
  """The Flax twin of the checkpoint (``width`` 64 published; narrower ones for tests). No
  normalisation unless ``mean``/``std`` are given (RobustBench feeds [0, 1] images)."""
  mean, std = statistics(mean, std)
  return models.PreActResNet18(num_classes=num_classes, width=width, mean=mean, std=std)


ARCHS = {"preact_resnet18": preact_resnet18}
IGNORE: tuple[str, ...] = ()

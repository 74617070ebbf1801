"""PyTorch CIFAR-10 checkpoints as Flax models: ``load_torch_model(path, arch, **options)``.

Exists so that gfa-jax's attacks can be run on models nobody here trained (the reference
AutoAttack's own example ResNet-18, RobustBench's entries) and compared with the reference
implementations on the same weights. Only the ``state_dict`` tensors are read, with
``torch.load(..., weights_only=True)``: no code is unpickled. torch is imported lazily, so the
library does not depend on it.

Archs, one file per family (the Flax architectures live in ``gfa_jax.models``; ``reader``
reads every checkpoint form and refuses keys that do not fit):

- ``resnet18`` (resnet.py): Kuang Liu's ResNet-18, as pyautoattack's examples/resnet.py.
- ``preact_resnet18`` (preact.py): RobustBench's ``PreActResNet18``.
- ``wrn-28-10``, ``wrn-34-10``, ``wrn-34-15``, ``wrn-34-20``, ``wrn-70-16`` (wrn.py):
  RobustBench's classic ``WideResNet`` (ReLU, no normalisation; the unused ``sub_block1`` is
  ignored).
- ``dm-wrn-28-10``, ``dm-wrn-34-10``, ``dm-wrn-34-20``, ``dm-wrn-70-16``, ``dm-wrn-82-8``,
  ``dm-wrn-94-16``, ``dm-wrn-106-16``, ``dm-preact-resnet18`` (dm.py): DeepMind's
  ``DMWideResNet`` / ``DMPreActResNet`` (``activation="swish"`` by default or ``"relu"``; the
  CIFAR-10 mean/std applied inside, as theirs).

Options (keyword arguments, per arch): ``num_classes``, ``mean``/``std`` (the statistics the
model normalises its input with), ``activation`` (WideResNets), ``depth``/``width`` (narrower
or other sizes of the same layout). The models take NHWC images in [0, 1] and run BatchNorm
with its running statistics (``train=False``), so the logits equal the torch module's in
``eval()`` and sample i's logits depend on image i alone (GFA's per-sample cosine is defined).
They carry ``penalty.tap``s: ``layer0`` the image the stem sees, ``layer1`` .. the inputs of
the residual blocks, the last the pooled features.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gfa_jax import models
from gfa_jax.torch_import import dm, preact, resnet, wrn
from gfa_jax.torch_import import reader
from gfa_jax.torch_import.reader import read_state_dict

FAMILIES = (resnet, preact, wrn, dm)
ARCHS: dict[str, Callable[..., Any]] = {arch: factory for family in FAMILIES
                                        for arch, factory in family.ARCHS.items()}
_IGNORE = {a: family.IGNORE for family in FAMILIES for a in family.ARCHS}
# The ResNet-18 of the two torch layouts, under its former name (benchmarks use it).
TorchResNet18 = models.ResNet18

__all__ = ["ARCHS", "TorchResNet18", "build_model", "convert_state_dict", "load_torch_model",
           "read_state_dict"]


def build_model(arch: str, **options: Any):
  """The Flax module of ``arch`` with ``options`` (see the module doc); ValueError in one line
  for an unknown arch or option."""
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}.")
  accepted = [name for name, p in inspect.signature(ARCHS[arch]).parameters.items()
              if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"arch {arch!r} has no option(s) {unknown}; its options are "
                     f"{sorted(accepted)}.")
  return ARCHS[arch](**options)


def convert_state_dict(state: Mapping[str, np.ndarray], arch: str, **options: Any,
                       ) -> tuple[Callable, dict]:
  """``(apply_fn, variables)`` of ``arch`` (built with ``options``) holding the tensors of
  ``state``; ValueError naming every missing, unexpected or mis-shaped key (``reader.assign``),
  so a checkpoint of another architecture fails at once instead of giving wrong logits."""
  model = build_model(arch, **options)
  return model.apply, reader.assign(model, state, arch, ARCHS, ignore=_IGNORE[arch])


def load_torch_model(path: str | Path, arch: str, **options: Any,
                     ) -> tuple[Callable, dict[str, Any]]:
  """Loads a PyTorch CIFAR-10 checkpoint file as a Flax model in inference mode.

  Returns:
    ``(apply_fn, variables)``: ``apply_fn(variables, x)`` maps float32 NHWC images in [0, 1]
    to logits, like ``gfa_jax.load_model``; ``variables`` holds ``params`` and
    ``batch_stats``.
  """
  build_model(arch, **options)  # an unknown arch or option fails before the file is read
  return convert_state_dict(read_state_dict(path), arch, **options)

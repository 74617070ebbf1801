"""Models. Each takes images in [0, 1] (NHWC) and returns logits.

Normalisation happens inside the model, so attacks and epsilons always live in [0, 1] pixel
space. Every layer input goes through ``penalty.tap`` under the name ``layer<i>`` (``layer0``
is the normalised image the first layer sees; for the ResNets, WideResNets and ViT
``layer<i>``, i >= 1, is the input of residual / transformer block i, the last the pooled
features): that is all a model needs for GFA.

Registry (``create_model``; ``from_config`` for a config's ``model`` section): small_cnn (the
paper's CNN), mlp, resnet20, vit, which never mix the samples of a batch (GFA's cosine is per
sample); and the BatchNorm architectures of the torch code bases, with torch's parameter
layout so that ``gfa_jax.torch_import`` loads their checkpoints: resnet18, preact_resnet18,
wrn (RobustBench's WideResNet: depth, width, activation), dm_wrn and dm_preact_resnet
(DeepMind's). Those take ``__call__(x, train=False)``: inference uses the running statistics
(per sample); ``model.apply(variables, x, train=True, mutable=["batch_stats"])`` trains them.

Files: ``conv`` (convolutions with explicit VJPs and the layers built on them), ``common``
(normalisation, BatchNorm, activations), ``small`` (SmallCNN, MLP), ``resnet``,
``wide_resnet``, ``vit``.
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

from gfa_jax.models.common import (ACTIVATIONS, BN_EPS, BN_MOMENTUM, activation, batch_norm,
                                   max_pool_2x2, maybe_normalize, normalize)
from gfa_jax.models.conv import (_kernel_gradient, conv3x3, conv_same,  # noqa: F401
                                 conv_same_for_flax, conv_same_subsampled, torch_conv)
from gfa_jax.models.resnet import (CIFAR10_MEAN, CIFAR10_STD, BasicBlock, DMPreActBlock,
                                   DMPreActResNet, PreActBlock, PreActResNet18, ResNet18, ResNet20,
                                   TorchBasicBlock, group_norm)
from gfa_jax.models.small import MLP, SmallCNN
from gfa_jax.models.vit import TransformerBlock, ViT
from gfa_jax.models.wide_resnet import DMWideResNet, WideBlock, WideResNet

__all__ = ["ACTIVATIONS", "BN_EPS", "BN_MOMENTUM", "CIFAR10_MEAN", "CIFAR10_STD", "MLP", "MODELS",
           "BasicBlock", "DMPreActBlock", "DMPreActResNet", "DMWideResNet",
           "PreActBlock", "PreActResNet18", "ResNet18", "ResNet20", "SmallCNN", "TorchBasicBlock",
           "TransformerBlock", "ViT", "WideBlock", "WideResNet", "abstract_params", "activation",
           "batch_norm", "conv3x3", "conv_same", "conv_same_for_flax", "conv_same_subsampled",
           "create_model", "from_config", "group_norm", "init_params", "max_pool_2x2",
           "maybe_normalize", "normalize", "torch_conv"]


MODELS = {"small_cnn": SmallCNN, "mlp": MLP, "resnet20": ResNet20, "vit": ViT,
          # BatchNorm models (``__call__(x, train=False)``; their variables hold batch_stats)
          "resnet18": ResNet18, "preact_resnet18": PreActResNet18,
          "wrn": WideResNet, "dm_wrn": DMWideResNet, "dm_preact_resnet": DMPreActResNet}


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

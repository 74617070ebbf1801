"""PyTorch CIFAR-10 checkpoints as Flax models: ``load_torch_model(path, arch)``.

Exists so that gfa-jax's attacks can be run on models nobody here trained (the reference
AutoAttack's own example ResNet-18, RobustBench-style models) and compared with the reference
implementations on the same weights. Only the ``state_dict`` tensors are read, with
``torch.load(..., weights_only=True)``: no code is unpickled. torch is imported lazily, so the
library does not depend on it.

Archs (the layouts of the common CIFAR code bases):

- ``resnet18``: the "Kuang Liu" ResNet-18 (``pytorch-cifar``), also
  ``pyautoattack/examples/resnet.py``: conv3x3(64)-BN-ReLU stem, four stages of two
  ``BasicBlock``s (64, 128, 256, 512 channels), 4x4 average pool, linear head.
- ``preact_resnet18``: RobustBench's ``PreActResNet18`` (pre-activation blocks, a final
  BN-ReLU before the pool, key ``bn``; shortcut a bare 1x1 conv, key ``shortcut.0``).

The Flax models take NHWC images in [0, 1] (no normalisation, as both code bases; pass
``mean``/``std`` for checkpoints trained on normalised inputs) and run BatchNorm with its
running statistics (inference mode), so the logits equal the torch module's in ``eval()``.
With the statistics fixed, sample i's logits depend on image i alone, so GFA's per-sample
cosine is defined; the models carry ``penalty.tap``s like ``models.ResNet20``'s (``layer0`` the
image the stem sees, ``layer1`` .. ``layer8`` the inputs of the eight blocks, ``layer9`` the
pooled features), so alignment can be measured on imported models too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gfa_jax import models
from gfa_jax.penalty import tap

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)


def _conv(features: int, kernel: int, stride: int, name: str) -> Callable:
  """torch's ``Conv2d(k, stride, padding=k // 2, bias=False)`` for odd k, through
  ``models.conv_same`` (its explicit VJP keeps input gradients fast inside the attacks' XLA
  loops: lax's own convolution made APGD on this ResNet-18 several times slower on CPU).

  Stride 2 is ``models.conv_same_subsampled``, the stride-1 output at even positions (torch's
  windows start at -1 with padding 1, exactly the 'SAME' windows centred on even pixels) as
  one strided convolution; a 1x1 convolution subsamples first.
  """
  subsample = stride if kernel > 1 else 1
  conv = nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=False, name=name,
                 conv_general_dilated=functools.partial(models.conv_same_for_flax,
                                                        subsample=subsample))
  if stride == subsample:
    return conv
  return lambda x: conv(x[:, ::stride, ::stride, :])


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, name=name)


class BasicBlock(nn.Module):
  """Post-activation block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    out = nn.relu(_bn("bn1")(_conv(self.features, 3, self.stride, "conv1")(x)))
    out = _bn("bn2")(_conv(self.features, 3, 1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _bn("shortcut_1")(_conv(self.features, 1, self.stride, "shortcut_0")(x))
    return nn.relu(out + x)


class PreActBlock(nn.Module):
  """Pre-activation block: conv2(relu(bn2(conv1(a)))) + shortcut, a = relu(bn1(x))."""
  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    out = nn.relu(_bn("bn1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, "shortcut_0")(out)
    out = _conv(self.features, 3, self.stride, "conv1")(out)
    out = _conv(self.features, 3, 1, "conv2")(nn.relu(_bn("bn2")(out)))
    return out + shortcut


class TorchResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs in the torch layouts above (``preact`` picks the variant)."""
  num_classes: int = 10
  preact: bool = False
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x):
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    out = _conv(64, 3, 1, "conv1")(tap(self, "layer0", x))
    if not self.preact:
      out = nn.relu(_bn("bn1")(out))
    block = PreActBlock if self.preact else BasicBlock
    layer = 1
    for stage, (features, stride) in enumerate(STAGES, start=1):
      for index in range(2):
        out = tap(self, f"layer{layer}", out)
        out = block(features, stride if index == 0 else 1, name=f"layer{stage}_{index}")(out)
        layer += 1
    if self.preact:
      out = nn.relu(_bn("bn")(out))
    out = jnp.mean(out, axis=(1, 2))  # avg_pool2d(out, 4) of the 4x4 map, then flatten
    out = tap(self, f"layer{layer}", out)
    return nn.Dense(self.num_classes, name="linear")(out)


ARCHS = {"resnet18": False, "preact_resnet18": True}  # arch -> preact


def _flax_leaf_to_torch(path: tuple[str, ...]) -> tuple[str, str]:
  """(torch tensor name, kind) of one Flax variable path, e.g. ('params', 'layer1_0',
  'conv1', 'kernel') -> ('layer1.0.conv1.weight', 'conv')."""
  collection, *modules, leaf = path
  name = ".".join(m.replace("_", ".") for m in modules)
  if collection == "batch_stats":
    return f"{name}.running_{'mean' if leaf == 'mean' else 'var'}", "bn_stat"
  if leaf == "kernel":
    return f"{name}.weight", "dense" if modules[-1] == "linear" else "conv"
  if leaf == "scale":
    return f"{name}.weight", "bn"
  return f"{name}.bias", "bias"


def _to_flax(tensor: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # torch [out, in, kh, kw] -> Flax HWIO
    return tensor.transpose(2, 3, 1, 0)
  if kind == "dense":  # torch [out, in] -> Flax [in, out]
    return tensor.T
  return tensor


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """The tensors of a torch ``state_dict`` file as float32 numpy arrays, keyed by name.

  Unwraps the usual containers (``{'state_dict': ...}``, ``{'model': ...}``, ``{'net': ...}``)
  and the ``module.`` prefix of ``DataParallel``; ``num_batches_tracked`` counters are dropped.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError("load_torch_model needs PyTorch: pip install -e '.[crosscheck]' "
                      "(or any torch build).") from e
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file; pass the path of a torch state_dict "
                            "(.pt/.pth) file.")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a file it cannot read safely
    raise ValueError(f"{path}: not a torch state_dict file that loads with weights_only=True "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
  for container in ("state_dict", "model_state_dict", "model", "net"):
    if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
      state = state[container]
  if not isinstance(state, Mapping) or not all(hasattr(v, "shape") for v in state.values()):
    raise ValueError(f"{path}: expected a mapping of tensor names to tensors (a state_dict), "
                     f"got {type(state).__name__}.")
  out = {}
  for key, value in state.items():
    key = key.removeprefix("module.")
    if not key.endswith("num_batches_tracked"):
      out[key] = value.detach().cpu().float().numpy()
  return out


def convert_state_dict(state: Mapping[str, np.ndarray], arch: str, *, num_classes: int = 10,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       ) -> tuple[Callable, dict]:
  """``(apply_fn, variables)`` of ``arch`` holding the tensors of ``state`` (see module doc).

  Raises ValueError naming every missing, unexpected or mis-shaped key, so a checkpoint of
  another architecture fails at once instead of giving wrong logits.
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}.")
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither.")
  model = TorchResNet18(num_classes=num_classes, preact=ARCHS[arch],
                        mean=None if mean is None else tuple(mean),
                        std=None if std is None else tuple(std))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # The weights only: init also makes the taps' collections (zero perturbations, sown inputs).
  abstract = {k: abstract[k] for k in ("params", "batch_stats")}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values, missing, misshaped, used = [], [], [], set()
  for key_path, leaf in leaves:
    name, kind = _flax_leaf_to_torch(tuple(k.key for k in key_path))
    if name not in state:
      missing.append(name)
      values.append(None)
      continue
    used.add(name)
    value = _to_flax(np.asarray(state[name], np.float32), kind)
    if value.shape != leaf.shape:
      misshaped.append(f"{name} {tuple(np.asarray(state[name]).shape)}")
    values.append(value)
  unexpected = sorted(set(state) - used)
  if missing or unexpected or misshaped:
    problems = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped)) if names]
    raise ValueError(f"the state_dict does not fit arch {arch!r} ({'; '.join(problems)}); "
                     f"check --arch (one of {sorted(ARCHS)}) and num_classes.")
  variables = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])
  return model.apply, variables


def load_torch_model(path: str | Path, arch: str, *, num_classes: int = 10,
                     mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> tuple[Callable, dict[str, Any]]:
  """Loads a PyTorch CIFAR-10 ``state_dict`` file as a Flax model in inference mode.

  Returns:
    ``(apply_fn, variables)``: ``apply_fn(variables, x)`` maps float32 NHWC images in [0, 1]
    to logits, like ``gfa_jax.load_model``.
  """
  return convert_state_dict(read_state_dict(path), arch, num_classes=num_classes, mean=mean,
                            std=std)

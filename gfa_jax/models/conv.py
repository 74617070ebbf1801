"""Convolutions with explicit VJPs (``conv_same``, ``conv_same_subsampled``) and the Flax
convolution layers built on them: ``conv3x3`` (bundled models), ``torch_conv`` (torch's
``padding=k // 2`` convolutions, imported and BatchNorm models) and ``pad_end_conv``
(DeepMind's stride-2 convolutions padded (0, 1), TF's 'SAME').
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
                       subsample: int = 1, pad_end: bool = False) -> jax.Array:
  """``conv_same`` behind ``nn.Conv(..., conv_general_dilated=...)``'s calling convention.

  ``functools.partial(conv_same_for_flax, subsample=s)`` behind a stride-1 'SAME' ``nn.Conv``
  gives ``conv_same_subsampled``, torch's stride-s convolution with padding k // 2 (flax's own
  'SAME' at stride 2 pads (0, 1) instead, so that is refused here).

  ``pad_end=True`` with ``subsample=2`` gives that other one, DeepMind's ``F.pad(x, (0, 1, 0,
  1))`` then a stride-2 convolution (TF's 'SAME' on even sizes), whose windows are centred on
  the odd pixels: on an even-sized image, flipping it maps odd pixels to even ones, so it is
  ``conv_same_subsampled`` of the flipped image with the flipped kernel, flipped back (two cheap
  reversals keep the explicit VJP and the strided forward pass).
  """
  plain = (tuple(window_strides) == (1, 1) and padding == "SAME"
           and tuple(lhs_dilation) == tuple(rhs_dilation) == (1, 1)
           and feature_group_count == 1 and precision is None
           and all(k % 2 for k in rhs.shape[:2])
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    raise ValueError("conv_same_for_flax serves only stride-1 'SAME' NHWC convolutions with odd "
                     "kernels, no dilation or groups; use nn.Conv's default for others")
  if subsample == 1:
    return conv_same(lhs, rhs)
  if not pad_end:
    return conv_same_subsampled(lhs, rhs, subsample)
  if subsample != 2 or any(n % 2 for n in lhs.shape[1:3]):
    raise ValueError(f"pad_end convolutions need stride 2 and even image sizes, got stride "
                     f"{subsample} on {lhs.shape[1:3]}; resize the images to even sizes")
  out = conv_same_subsampled(jnp.flip(lhs, (1, 2)), jnp.flip(rhs, (0, 1)), 2)
  return jnp.flip(out, (1, 2))



def conv3x3(features: int, strides: int = 1, explicit_conv_vjp: bool = True,
            dtype: str | None = None) -> Any:
  """A bias-free 3x3 convolution with padding 1 (PyTorch's ``padding=1``), stride 1 or 2,
  computing in ``dtype`` (None: float32, as its kernel).

  With ``explicit_conv_vjp`` it runs through ``conv_same``, stride 2 through
  ``conv_same_subsampled`` (same values as lax's strided convolution with padding
  ((1, 1), (1, 1)), which ``explicit_conv_vjp=False`` uses; conv_same's derivatives).
  """
  init = nn.initializers.he_normal()
  if not explicit_conv_vjp:
    return nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)), use_bias=False,
                   kernel_init=init, dtype=dtype)
  return nn.Conv(features, (3, 3), padding="SAME", use_bias=False, kernel_init=init, dtype=dtype,
                 conv_general_dilated=functools.partial(conv_same_for_flax, subsample=strides))


# torch's default for WideResNets (normal with std sqrt(2 / (k * k * out))): He, fan out.
_TORCH_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_conv(features: int, kernel: int, stride: int, name: str, *,
               pad_end: bool = False) -> Callable[[jax.Array], jax.Array]:
  """torch's ``Conv2d(k, stride, padding=k // 2, bias=False)`` for odd k, through ``conv_same``
  (its explicit VJP keeps input gradients fast inside the attacks' XLA loops: lax's own
  convolution made APGD on an imported ResNet-18 several times slower on CPU).

  Stride s > 1 is ``conv_same_subsampled`` (one strided convolution); a 1x1 convolution
  subsamples first (torch's padding 0). ``pad_end`` gives DeepMind's stride-2 convolutions
  padded (0, 1) instead (``conv_same_for_flax``). Returns the layer, a callable on NHWC arrays.
  """
  subsample = stride if kernel > 1 else 1
  conv = nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=False, name=name,
                 kernel_init=_TORCH_CONV_INIT,
                 conv_general_dilated=functools.partial(conv_same_for_flax, subsample=subsample,
                                                        pad_end=pad_end))
  if stride == subsample:
    return conv
  return lambda x: conv(x[:, ::stride, ::stride, :])

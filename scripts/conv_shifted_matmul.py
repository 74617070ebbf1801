"""Lever check (issue 18): XLA CPU's convolution against nine shifted matmuls, SmallCNN layers.

    JAX_PLATFORMS=cpu python scripts/conv_shifted_matmul.py [--batch 128]   # a JSON line a layer

Why: convolutions are 75 % of the GFA step and XLA CPU runs them at 70-200 GFLOP/s where its
matmul reaches about 470, so a 3x3 convolution written as nine matmuls of shifted views (each a
`dot_general` over the channels) might run in the GEMM kernel instead. For each of SmallCNN's
three convolutions this times the forward pass, the input gradient (a forward convolution with
the flipped, transposed kernel, as `models.conv_same` computes it) and the kernel gradient, both
ways: median of 20 calls after two warm-up calls, jitted, with the flag train.py sets unless
$XLA_FLAGS is set. It also reports XLA's temporary buffer size of each compiled function and the
largest difference between the two ways (a check that they compute the same thing).
"""

import argparse
import json
import os
import time

from gfa_jax import xla_flags

xla_flags.use_fast_cpu_convolutions()  # before JAX starts its backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
LAYERS = {"conv1": (32, 4, 32), "conv2": (16, 32, 64), "conv3": (8, 64, 128)}  # H=W, in, out


def lax_conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)


def _padded(x, size):
  kh, kw = size
  return jnp.pad(x, ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))


def shifted_conv(x, k):
  """The same 'SAME' convolution as a sum of kh * kw matmuls over the channels."""
  kh, kw = k.shape[:2]
  _, h, w, _ = x.shape
  xp = _padded(x, (kh, kw))
  return sum(jnp.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w, :], k[i, j])
             for i in range(kh) for j in range(kw))


def lax_kernel_gradient(x, g):
  """``models._kernel_gradient``'s convolution over the batch (3x3 kernels)."""
  return lax.conv_general_dilated(x, g, (1, 1), [(1, 1), (1, 1)],
                                  dimension_numbers=("CHWN", "IHWO", "HWNC"))


def shifted_kernel_gradient(x, g, size=(3, 3)):
  """The same kernel gradient as kh * kw matmuls contracting batch and positions."""
  _, h, w, _ = x.shape
  xp = _padded(x, size)
  return jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w, :], g)
                               for j in range(size[1])]) for i in range(size[0])])


def median_ms(f, *args, n=20):
  f = jax.jit(f)
  for _ in range(2):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return round(1e3 * sorted(times)[n // 2], 2)


def temp_mb(f, *args):
  return round(jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20, 1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args()
  key = jax.random.key(0)
  for name, (hw, cin, cout) in LAYERS.items():
    kx, kk, kg = jax.random.split(key, 3)
    x = jax.random.normal(kx, (args.batch, hw, hw, cin))
    k = 0.1 * jax.random.normal(kk, (3, 3, cin, cout))
    g = jax.random.normal(kg, (args.batch, hw, hw, cout))
    k_t = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    reference = lax_kernel_gradient(x, g)
    record = {
        "layer": name, "batch": args.batch, "threads": len(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "fwd_lax": median_ms(lax_conv, x, k), "fwd_shift": median_ms(shifted_conv, x, k),
        "igrad_lax": median_ms(lax_conv, g, k_t), "igrad_shift": median_ms(shifted_conv, g, k_t),
        "kgrad_lax": median_ms(lax_kernel_gradient, x, g),
        "kgrad_shift": median_ms(shifted_kernel_gradient, x, g),
        "max_err_fwd": float(jnp.abs(lax_conv(x, k) - shifted_conv(x, k)).max()),
        "rel_err_kgrad": float(jnp.abs(reference - shifted_kernel_gradient(x, g)).max()
                               / jnp.abs(reference).max()),
        "temp_mb_fwd": temp_mb(lax_conv, x, k), "temp_mb_fwd_shift": temp_mb(shifted_conv, x, k),
        "temp_mb_kgrad": temp_mb(lax_kernel_gradient, x, g),
        "temp_mb_kgrad_shift": temp_mb(shifted_kernel_gradient, x, g)}
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()

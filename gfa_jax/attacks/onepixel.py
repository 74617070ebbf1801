"""One Pixel Attack (Su, Vargas & Sakurai, IEEE TEC 2019): differential evolution over pixels.

A candidate is `pixels` tuples (row, col, colour...) in a flat vector; the fitness to minimise is
the softmax probability of the true class on the image with those pixels set (computed here from
the model's logits). Settings follow the paper's untargeted CIFAR-10 attack: population 400, at
most 100 generations, DE/rand/1 mutation with F = 0.5 and no crossover, a child replaces its
parent when it is fitter, coordinates initialised uniformly over the image and colours from
N(128, 127) / 255, search stopped per example as soon as it is misclassified.

Threat model: L0 (at most `pixels` pixels change, each to any colour), not an eps-ball.
Everything is vectorised over batch x population: one model call sees batch * chunk_size
images (chunk_size defaults to the whole population). The loop stops only when every example of
the batch is fooled, so small batches (gfa_jax.evaluate uses batch_size // population examples)
waste the least work on examples already fooled.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gfa_jax.attacks import core


def apply_pixels(x: jax.Array, candidate: jax.Array) -> jax.Array:
  """Sets pixels of x [B, H, W, C] from candidate [B, pixels * (2 + C)]; returns [B, H, W, C].

  Coordinates are floored into the image, colours clipped into [0, 1]; a later pixel of the same
  candidate wins if two coincide.
  """
  b, h, w, c = x.shape
  genes = candidate.reshape(b, -1, 2 + c)
  rows = jnp.clip(jnp.floor(genes[..., 0]), 0, h - 1).astype(jnp.int32)
  cols = jnp.clip(jnp.floor(genes[..., 1]), 0, w - 1).astype(jnp.int32)
  colours = jnp.clip(genes[..., 2:], 0.0, 1.0)
  batch = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
  return x.at[batch, rows, cols].set(colours)


def _random_population(key, batch, population, pixels, h, w, c):
  """[B, P, pixels * (2 + C)]: coordinates ~ U[0, size), colours ~ N(0.5, 127/255) clipped."""
  key_pos, key_col = jax.random.split(key)
  pos = jax.random.uniform(key_pos, (batch, population, pixels, 2)) * jnp.array([h, w])
  colour = 0.5 + (127.0 / 255.0) * jax.random.normal(key_col, (batch, population, pixels, c))
  return jnp.concatenate([pos, jnp.clip(colour, 0.0, 1.0)], -1).reshape(batch, population, -1)


def _distinct_others(key, shape, population):
  """Three indices per member, distinct from each other and from the member itself.

  Offsets k1, k2, k3 in [1, P) drawn without replacement by the "skip what is taken" trick, then
  r_j = (i + k_j) mod P; uniform over ordered triples and O(1) memory per member.
  """
  k1_key, k2_key, k3_key = jax.random.split(key, 3)
  k1 = jax.random.randint(k1_key, shape, 1, population)
  k2 = jax.random.randint(k2_key, shape, 1, population - 1)
  k2 = k2 + (k2 >= k1)
  lo, hi = jnp.minimum(k1, k2), jnp.maximum(k1, k2)
  k3 = jax.random.randint(k3_key, shape, 1, population - 2)
  k3 = k3 + (k3 >= lo)
  k3 = k3 + (k3 >= hi)
  i = jnp.arange(population)
  return [(i + k) % population for k in (k1, k2, k3)]


def onepixel(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
             key: jax.Array, pixels: int = 1, population: int = 400, iterations: int = 100,
             mutation: float = 0.5, chunk_size: int | None = None) -> jax.Array:
  """Untargeted one-pixel (L0) attack; returns images [B, H, W, C] differing from x in at most
  `pixels` pixels, in [0, 1].

  Args:
    logits_fn: images in [0, 1] -> logits [B, K]; only forward passes are used.
    x: clean images [B, H, W, C] in [0, 1].
    y: int labels [B].
    key: PRNG key for the initial population and every generation.
    pixels: number of pixels the attack may change.
    population: DE population size per example (paper: 400).
    iterations: maximum number of generations (paper: 100).
    mutation: DE scale factor F (paper: 0.5).
    chunk_size: candidates per example evaluated in one model call (memory knob only; it must
      divide `population`; default: the whole population).

  Per example the returned image carries the fittest candidate: a misclassified one if any was
  found (search stops there), else the one with the lowest true-class probability.
  """
  core.check_images(x)
  if pixels < 1:
    raise ValueError(f"pixels must be >= 1, got {pixels}.")
  if population < 4:
    raise ValueError(f"population must be >= 4 (DE/rand/1 needs three others), got {population}.")
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}.")
  chunk_size = population if chunk_size is None else chunk_size
  if chunk_size < 1 or population % chunk_size:
    raise ValueError(f"chunk_size must divide population={population}, got {chunk_size}.")
  b, h, w, c = x.shape
  x = jax.lax.stop_gradient(x)
  upper = jnp.array([h, w] + [1.0] * c) - jnp.array([1e-3, 1e-3] + [0.0] * c)
  upper = jnp.tile(upper, pixels)

  def fitness(candidates):
    """[B, P, D] -> true-class probability minus 1 where misclassified, [B, P].

    Misclassified candidates (in [-1, 0)) always beat correctly classified ones (in [0, 1]).
    """
    chunks = candidates.reshape(b, population // chunk_size, chunk_size, -1).transpose(1, 2, 0, 3)

    def one_chunk(chunk):  # [chunk, B, D] -> [chunk, B]
      images = jax.vmap(apply_pixels, in_axes=(None, 0))(x, chunk)
      logits = logits_fn(images.reshape(-1, h, w, c)).reshape(chunk_size, b, -1)
      prob = jnp.take_along_axis(jax.nn.softmax(logits, -1), y[None, :, None], -1)[..., 0]
      return prob - (jnp.argmax(logits, -1) != y[None])

    return jax.lax.map(one_chunk, chunks).reshape(population, b).T

  key_init, key = jax.random.split(key)
  pop = _random_population(key_init, b, population, pixels, h, w, c)
  fit = fitness(pop)

  def cond(state):
    i, _, fit = state
    return (i < iterations) & jnp.any(jnp.min(fit, axis=1) >= 0)

  def body(state):
    i, pop, fit = state
    r1, r2, r3 = _distinct_others(jax.random.fold_in(key, i), (b, population), population)
    pick = lambda r: jnp.take_along_axis(pop, r[..., None], axis=1)
    children = jnp.clip(pick(r1) + mutation * (pick(r2) - pick(r3)), 0.0, upper)
    child_fit = fitness(children)
    searching = jnp.min(fit, axis=1, keepdims=True) >= 0  # examples not yet fooled
    replace = searching & (child_fit < fit)
    pop = jnp.where(replace[..., None], children, pop)
    return i + 1, pop, jnp.where(replace, child_fit, fit)

  _, pop, fit = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), pop, fit))
  best = jnp.take_along_axis(pop, jnp.argmin(fit, axis=1)[:, None, None], axis=1)[:, 0]
  return apply_pixels(x, best)

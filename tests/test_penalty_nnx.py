"""gfa_objective on Flax NNX modules: same numbers as the Linen twin, state, a train step."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gfa_jax import gfa_objective, tap, tap_module_inputs


class NNXNet(nnx.Module):
  """Two convolutions and a head; taps its image explicitly, the rest is tapped from outside."""

  def __init__(self, rngs: nnx.Rngs, batch_norm: bool = False):
    self.c1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs) if batch_norm else None
    self.drop = nnx.Dropout(0.3, rngs=rngs) if batch_norm else None
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = tap(self, "layer0", x)
    h = self.c1(x)
    h = jnp.tanh(self.bn(h) if self.bn is not None else h)
    h = jnp.tanh(self.c2(h)).mean(axis=(1, 2))
    return self.head(self.drop(h) if self.drop is not None else h)


class LinenTwin(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = tap(self, "layer0", x)
    h = jnp.tanh(nn.Conv(4, (3, 3))(x))
    h = jnp.tanh(nn.Conv(6, (3, 3))(h)).mean(axis=(1, 2))
    return nn.Dense(3)(h)


NNX_TO_LINEN = {"c1": "Conv_0", "c2": "Conv_1", "head": "Dense_0"}


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch(n=4):
  return jax.random.uniform(jax.random.key(0), (n, 5, 5, 2)), jnp.arange(n) % 3


def linen_params(model: NNXNet) -> dict:
  state = nnx.state(model, nnx.Param)
  return {NNX_TO_LINEN[k]: {n: v.get_value() for n, v in state[k].items()}
          for k in NNX_TO_LINEN}


@pytest.mark.parametrize("gradient", ["exact", "detached"])
def test_nnx_matches_its_linen_twin_under_jit(gradient):
  model = NNXNet(nnx.Rngs(0))
  x, y = batch()
  twin, params = LinenTwin(), linen_params(model)

  @nnx.jit
  def nnx_grad(model):
    return nnx.grad(lambda m: gfa_objective(m, None, x, y, ce, layers=["layer0", "c2"],
                                            beta=0.5, gradient=gradient), has_aux=True)(model)

  @jax.jit
  def linen_grad(params):
    with tap_module_inputs(["Conv_1"]):
      return jax.grad(lambda p: gfa_objective(twin.apply, p, x, y, ce,
                                              layers=["layer0", "Conv_1"], beta=0.5,
                                              gradient=gradient), has_aux=True)(params)

  grads, aux = nnx_grad(model)
  linen_grads, linen_aux = linen_grad(params)
  np.testing.assert_allclose(aux["penalty"], linen_aux["penalty"], rtol=1e-5)
  np.testing.assert_allclose(aux["alignment"]["layer0"], linen_aux["alignment"]["layer0"],
                             rtol=1e-5)
  np.testing.assert_allclose(aux["alignment"]["c2"], linen_aux["alignment"]["Conv_1"]["input"],
                             rtol=1e-5)
  chex.assert_trees_all_close(linen_params_of(grads), linen_grads, rtol=1e-4, atol=1e-7)
  assert aux["state"] == {} and linen_aux["state"] == {}


def linen_params_of(grads: nnx.State) -> dict:
  return {NNX_TO_LINEN[k]: {n: v.get_value() for n, v in grads[k].items()} for k in NNX_TO_LINEN}


def test_batchnorm_and_dropout_state_lands_in_the_module_in_train_mode_only():
  model = NNXNet(nnx.Rngs(0), batch_norm=True)
  x, y = batch()
  plain = nnx.clone(model)  # The same module run as a plain training forward pass.
  start = nnx.clone(model)  # And as it was before: the same dropout mask, for the hand check.
  objective = nnx.jit(lambda m: nnx.grad(
      lambda m: gfa_objective(m, None, x, y, ce, layers=["c1", "c2"]), has_aux=True)(m)[1])
  for m in (model, plain, start):
    m.train()
  aux = objective(model)
  logits = plain(x)
  # One forward pass: the batch statistics and the dropout mask (RNG count) of a plain call.
  chex.assert_trees_all_close(nnx.state(model, nnx.BatchStat), nnx.state(plain, nnx.BatchStat),
                              rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(nnx.state(model, nnx.RngCount), nnx.state(plain, nnx.RngCount))
  np.testing.assert_allclose(aux["logits"], logits, rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.bn.mean.get_value(), 0.0)
  # The gradient is that of the batch loss with the batch's statistics, w.r.t. c1's input x.
  by_hand = jax.grad(lambda v: ce(nnx.clone(start)(v), y))(x)
  cos = jnp.sum((by_hand * x).reshape(4, -1), 1) / (
      jnp.linalg.norm(by_hand.reshape(4, -1), axis=1) * jnp.linalg.norm(x.reshape(4, -1), axis=1))
  np.testing.assert_allclose(aux["alignment"]["c1"], jnp.mean(cos), rtol=1e-5)
  # Eval mode: running averages, no dropout, nothing written.
  model.eval()
  before = nnx.state(model, nnx.Not(nnx.Param))
  eval_aux = objective(model)
  chex.assert_trees_all_equal(nnx.state(model, nnx.Not(nnx.Param)), before)
  assert abs(float(eval_aux["penalty"]) - float(aux["penalty"])) > 1e-4


def test_nnx_train_step_with_an_optimizer_lowers_the_objective():
  model = NNXNet(nnx.Rngs(1), batch_norm=True)
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
  x, y = batch()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss(model):
      return gfa_objective(model, None, x, y, ce, layers=["c1", "layer0"], beta=1.0)
    (objective, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return objective, aux

  model.train()
  objectives = [float(train_step(model, optimizer, x, y)[0]) for _ in range(6)]
  assert objectives[-1] < objectives[0] - 1e-3, objectives
  assert int(optimizer.step.get_value()) == 6


def test_black_images_are_finite_and_untouched_modules_stay_plain():
  model = NNXNet(nnx.Rngs(0))
  x, y = jnp.zeros((3, 5, 5, 2)), jnp.array([0, 1, 2])
  (value, aux), grads = nnx.value_and_grad(
      lambda m: gfa_objective(m, None, x, y, ce, layers=["layer0", "c1", "c2"]),
      has_aux=True)(model)
  assert np.isfinite(value)
  chex.assert_tree_all_finite(grads)
  np.testing.assert_allclose(aux["alignment"]["c1"], 0.0)  # h = 0: cosine 0, not NaN.
  # Nothing was added to the module or its class: a plain call sows and taps nothing.
  assert set(nnx.state(model)) == {"c1", "c2", "head"}
  assert nnx.Conv.__call__ is nnx.Conv.__dict__["__call__"]
  np.testing.assert_allclose(model(x), aux["logits"], rtol=1e-6)


def test_nnx_bad_arguments_are_clear_errors():
  model = NNXNet(nnx.Rngs(0))
  x, y = batch()
  with pytest.raises(ValueError, match=r"unknown NNX layers \['conv9'\]"):
    gfa_objective(model, None, x, y, ce, layers=["conv9"])
  with pytest.raises(ValueError, match=r"\['params'\] with an NNX module"):
    gfa_objective(model, nnx.state(model, nnx.Param), x, y, ce, layers=["c1"])
  # layers=None: every tap the model makes itself.
  _, aux = gfa_objective(model, None, x, y, ce, layers=None)
  assert set(aux["alignment"]) == {"layer0"}


def test_readme_nnx_train_step_runs():
  import re

  from tests.conftest import REPO
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  snippet = next(b for b in blocks if "any NNX model, untouched" in b)
  x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 3))
  namespace = {"optax": optax, "loss": ce, "x": x, "y": jnp.array([1, 7])}
  exec(compile(snippet, "README.md", "exec"), namespace)
  assert np.isfinite(namespace["objective"])
  assert set(namespace["aux"]["alignment"]) == {"c1", "head"}
  assert not np.allclose(namespace["model"].bn.mean.get_value(), 0.0)


def test_nested_layers_are_named_by_attribute_path():
  class Block(nnx.Module):
    def __init__(self, width, rngs):
      self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.conv(x))

  class Deep(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(2, rngs), Block(2, rngs)])
      self.head = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return self.head(x.mean(axis=(1, 2)))

  model = Deep(nnx.Rngs(0))
  x, y = batch()
  _, aux = nnx.jit(lambda m: gfa_objective(m, None, x, y, ce, layers=["blocks/1/conv"]))(model)
  # blocks/1/conv's input is block 0's output h; its tap perturbs the convolution's input,
  # not the residual branch: dL/dh through the convolution only, by hand.
  h = model.blocks[0](x)
  conv_only = lambda t: h + jnp.tanh(model.blocks[1].conv(h + t))
  g = jax.grad(lambda t: ce(model.head(conv_only(t).mean(axis=(1, 2))), y))(jnp.zeros_like(h))
  cos = jnp.sum((g * h).reshape(4, -1), 1) / (
      jnp.linalg.norm(g.reshape(4, -1), axis=1) * jnp.linalg.norm(h.reshape(4, -1), axis=1))
  np.testing.assert_allclose(aux["cosines"]["blocks/1/conv"], cos, rtol=1e-5, atol=1e-6)

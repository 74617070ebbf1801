"""gfa_objective on Linen models with state: BatchNorm (training and eval mode) and dropout."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gfa_jax import gfa_objective, tap_module_inputs, zero_taps
from gfa_jax.penalty import per_sample_cosine

LAYERS = ("Conv_0", "Conv_1")


class BatchNormCNN(nn.Module):
  """A flax/examples-style CNN: convolutions with BatchNorm, dropout before the head."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (4, 6):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = jnp.tanh(x)
    x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(3)(x)


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def setup(batch=5):
  model = BatchNormCNN()
  x = jax.random.uniform(jax.random.key(0), (batch, 6, 6, 2))
  y = jnp.arange(batch) % 3
  with tap_module_inputs(LAYERS):
    variables = model.init(jax.random.key(1), x, train=False)
  # Non-trivial running statistics, so that eval mode differs from training mode.
  stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
  return model, variables["params"], {"batch_stats": stats}, x, y


def objective(model, params, state, x, y, train, key=None, **kwargs):
  with tap_module_inputs(LAYERS):
    return gfa_objective(model.apply, params, x, y, ce, layers=LAYERS, state=state,
                         mutable=("batch_stats",) if train else (),
                         rngs=None if key is None else {"dropout": key},
                         apply_kwargs={"train": train}, **kwargs)


@pytest.mark.slow
def test_batchnorm_train_mode_runs_under_jit_grad_and_updates_the_statistics_once():
  model, params, state, x, y = setup()
  key = jax.random.key(2)
  grad_fn = jax.jit(jax.grad(lambda p: objective(model, p, state, x, y, True, key), has_aux=True))
  grads, aux = grad_fn(params)
  chex.assert_tree_all_finite(grads)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # The statistics come from the batch's one forward pass: those of a plain training apply.
  _, plain = model.apply({"params": params, **state}, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": key})
  chex.assert_trees_all_close(aux["state"], plain, rtol=1e-6, atol=1e-7)
  assert not np.allclose(aux["state"]["batch_stats"]["BatchNorm_0"]["mean"],
                         state["batch_stats"]["BatchNorm_0"]["mean"])
  # Eval mode: nothing mutable, no state back.
  _, eval_aux = objective(model, params, state, x, y, False)
  assert eval_aux["state"] == {}


@pytest.mark.slow
def test_train_mode_gradient_is_that_of_the_batch_loss_with_batch_statistics():
  """The documented choice: dL/dh is the gradient of the batch loss with BatchNorm normalising
  by the batch's statistics (cross-sample terms included), h sample i's own layer input."""
  model, params, state, x, y = setup()
  key = jax.random.key(3)
  _, aux = objective(model, params, state, x, y, True, key)

  def batch_loss(images, train):
    logits, _ = model.apply({"params": params, **state}, images, train=train,
                            mutable=["batch_stats"], rngs={"dropout": key})
    return ce(logits, y)

  # Conv_0's input is the image itself, so jax.grad of the batch loss w.r.t. x is dL/dh.
  by_hand = jnp.mean(per_sample_cosine(jax.grad(batch_loss)(x, True), x))
  np.testing.assert_allclose(aux["alignment"]["Conv_0"]["input"], by_hand, rtol=1e-5)
  # Eval mode (running averages) is another function of x, with another alignment.
  _, eval_aux = objective(model, params, state, x, y, False)
  eval_by_hand = jnp.mean(per_sample_cosine(jax.grad(batch_loss)(x, False), x))
  np.testing.assert_allclose(eval_aux["alignment"]["Conv_0"]["input"], eval_by_hand, rtol=1e-5)
  assert abs(float(aux["penalty"]) - float(eval_aux["penalty"])) > 1e-3
  # The cross-sample terms matter: sample by sample (a batch of one each) gives another value.
  alone = jax.vmap(lambda xi, yi: per_sample_cosine(
      jax.grad(lambda v: ce(model.apply({"params": params, **state}, v, train=True,
                                        mutable=["batch_stats"], rngs={"dropout": key})[0],
                            yi[None]))(xi[None]), xi[None])[0])(x, y)
  assert abs(float(jnp.mean(alone)) - float(by_hand)) > 1e-4


def test_dropout_is_deterministic_for_a_fixed_key():
  model, params, state, x, y = setup()
  f = jax.jit(lambda p, k: objective(model, p, state, x, y, True, k)[0])
  a, b = f(params, jax.random.key(4)), f(params, jax.random.key(4))
  c = f(params, jax.random.key(5))
  np.testing.assert_array_equal(a, b)
  assert float(a) != float(c)
  with pytest.raises(Exception, match="dropout"):  # Flax's own error: no key, no dropout.
    objective(model, params, state, x, y, True)


def test_zero_taps_accepts_state_rngs_and_apply_kwargs():
  model, params, state, x, _ = setup()
  with tap_module_inputs(LAYERS):
    taps = zero_taps(model.apply, {"params": params}, x, state=state,
                     rngs={"dropout": jax.random.key(0)}, apply_kwargs={"train": True})
  chex.assert_trees_all_equal_shapes(taps, {"Conv_0": {"input": x},
                                            "Conv_1": {"input": jnp.zeros((5, 6, 6, 4))}})
  assert all(not v.any() for v in jax.tree.leaves(taps))


def test_black_images_with_batchnorm_are_finite():
  model, params, state, _, y = setup()
  x = jnp.zeros((5, 6, 6, 2))
  for p in (params, jax.tree.map(jnp.zeros_like, params)):
    (value, aux), grads = jax.value_and_grad(
        lambda p: objective(model, p, state, x, y, True, jax.random.key(0)), has_aux=True)(p)
    assert np.isfinite(value)
    chex.assert_tree_all_finite((grads, aux["state"]))


def test_readme_stateful_snippet_runs():
  import re

  from tests.conftest import REPO
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  snippet = next(b for b in blocks if 'mutable=["batch_stats"]' in b)
  model, params, state, x, y = setup()
  namespace = {"jax": jax, "gfa_objective": gfa_objective, "tap_module_inputs": tap_module_inputs,
               "model": model, "params": params, "batch_stats": state["batch_stats"], "x": x,
               "y": y, "loss": ce, "key": jax.random.key(0)}
  exec(compile(snippet, "README.md", "exec"), namespace)
  chex.assert_tree_all_finite(namespace["grads"])
  assert not np.allclose(namespace["batch_stats"]["BatchNorm_1"]["var"],
                         state["batch_stats"]["BatchNorm_1"]["var"])


def test_mutable_takes_one_name_and_rejects_a_bool():
  model, params, state, x, y = setup()
  run = lambda mutable: gfa_objective(
      model.apply, params, x, y, ce, layers=None, state=state, mutable=mutable,
      rngs={"dropout": jax.random.key(0)}, apply_kwargs={"train": True})
  with tap_module_inputs(LAYERS):
    _, aux = run("batch_stats")
    assert set(aux["state"]) == {"batch_stats"}
    with pytest.raises(ValueError, match="mutable must name the collections"):
      run(True)

"""gfa_penalty against a brute-force per-sample reference, plus its safety at zero."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gfa_jax import gfa_objective, gfa_penalty, tap, tap_module_inputs, zero_taps
from gfa_jax.penalty import FEATURES, TAPS, per_sample_cosine, safe_norm


class SmoothNet(nn.Module):
  """Tanh MLP (smooth, so finite differences are meaningful) with three taps."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for i, width in enumerate((7, 5)):
      h = tap(self, f"layer{i}", h)
      h = jnp.tanh(nn.Dense(width)(h))
    h = tap(self, "layer2", h)
    return nn.Dense(3)(h)


def mse_loss(logits, y):
  return jnp.mean((jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1])) ** 2)


def setup(batch=6, dtype=jnp.float32):
  model = SmoothNet()
  # Images in [0, 1]: gfa_objective checks its images as the attacks do.
  x = jax.random.uniform(jax.random.key(0), (batch, 2, 2, 2), dtype)
  y = jnp.arange(batch) % 3
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  return model, params, x, y


def penalty_via_library(model, params, x, y, layers):
  taps = zero_taps(model.apply, {"params": params}, x, names=layers)

  def loss_fn(taps):
    logits, state = model.apply({"params": params, TAPS: taps}, x, mutable=[FEATURES])
    return mse_loss(logits, y), {k: state[FEATURES][k] for k in layers}

  return gfa_penalty(loss_fn, taps)


def penalty_brute_force(model, params, x, y, layers):
  """Per sample i: grad of sample i's own loss w.r.t. its own layer input (explicit jax.grad),
  cosine with that input, batch mean, then mean over layers of (1 - alignment)."""
  def one_sample(xi, yi):
    taps = zero_taps(model.apply, {"params": params}, xi[None], names=layers)

    def loss_fn(taps):
      logits, state = model.apply({"params": params, TAPS: taps}, xi[None], mutable=[FEATURES])
      return mse_loss(logits, yi[None]), {k: state[FEATURES][k] for k in layers}

    grads, features = jax.grad(loss_fn, has_aux=True)(taps)
    return {k: per_sample_cosine(grads[k], features[k])[0] for k in layers}

  cosines = jax.vmap(one_sample)(x, y)
  alignment = {k: jnp.mean(v) for k, v in cosines.items()}
  return 1.0 - sum(alignment.values()) / len(layers), alignment


@pytest.mark.parametrize("layers", [("layer0",), ("layer0", "layer1", "layer2")])
def test_matches_brute_force_value_alignment_and_param_gradient(layers):
  model, params, x, y = setup()
  penalty, aux = penalty_via_library(model, params, x, y, layers)
  expected_penalty, expected_alignment = penalty_brute_force(model, params, x, y, layers)
  np.testing.assert_allclose(penalty, expected_penalty, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(aux["alignment"], expected_alignment, rtol=1e-5, atol=1e-6)
  grad_lib = jax.grad(lambda p: penalty_via_library(model, p, x, y, layers)[0])(params)
  grad_ref = jax.grad(lambda p: penalty_brute_force(model, p, x, y, layers)[0])(params)
  chex.assert_trees_all_close(grad_lib, grad_ref, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(g).max()) > 1e-4 for g in jax.tree.leaves(grad_lib))


def test_task_loss_in_aux_is_the_plain_loss():
  model, params, x, y = setup()
  _, aux = penalty_via_library(model, params, x, y, ("layer0",))
  np.testing.assert_allclose(aux["task_loss"], mse_loss(model.apply({"params": params}, x), y),
                             rtol=1e-6)


def test_second_order_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    model, params, x, y = setup(dtype=jnp.float64)
    check_grads(lambda p: penalty_via_library(model, p, x, y, ("layer0", "layer1"))[0],
                (params,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_works_under_jit_and_vmap():
  model, params, x, y = setup()
  f = lambda p, x: penalty_via_library(model, p, x, y, ("layer1",))[0]
  np.testing.assert_allclose(jax.jit(f)(params, x), f(params, x), rtol=1e-5)
  stacked = jnp.stack([x, 2 * x])
  per_copy = jax.vmap(f, in_axes=(None, 0))(params, stacked)
  chex.assert_shape(per_copy, (2,))
  np.testing.assert_allclose(per_copy[1], f(params, 2 * x), rtol=1e-5)


def test_safe_norm_gradient_is_zero_not_nan_at_zero():
  g = jax.grad(lambda v: safe_norm(v))(jnp.zeros(4))
  chex.assert_trees_all_equal(g, jnp.zeros(4))
  naive = jax.grad(lambda v: jnp.sqrt(jnp.sum(v * v)) + 1e-12)(jnp.zeros(4))
  assert not np.isfinite(naive).all()  # The failure mode safe_norm exists for.


def test_zero_features_and_zero_gradients_are_finite():
  """A black image with an identity normaliser (h = 0 at layer0), and all-zero parameters
  (dL/dh = 0 everywhere): value and parameter gradient stay finite."""
  from gfa_jax.models import SmallCNN
  model = SmallCNN(mean=(0.0,) * 3, std=(1.0,) * 3)
  x = jnp.zeros((2, 32, 32, 3))
  y = jnp.array([0, 1])
  params = model.init(jax.random.key(0), x)["params"]
  zero_params = jax.tree.map(jnp.zeros_like, params)
  for p in (params, zero_params):
    value_and_grad = jax.value_and_grad(lambda p: gfa_objective(
        model.apply, p, x, y, mse_loss, layers=("layer0", "layer1", "layer2"))[0])
    value, grads = value_and_grad(p)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)


def test_structure_mismatch_is_a_clear_error():
  model, params, x, y = setup()
  taps = zero_taps(model.apply, {"params": params}, x, names=("layer0",))
  with pytest.raises(ValueError, match="same tree structure"):
    gfa_penalty(lambda t: (jnp.sum(t["layer0"]), {"a": x, "b": x}), taps)


def test_layer_weights_of_untapped_layers_are_a_clear_error():
  model, params, x, y = setup()
  with pytest.raises(ValueError, match="weight only tapped layers"):
    gfa_objective(model.apply, params, x, y, mse_loss, layers=("layer0",),
                  layer_weights={"layer2": 2.0})


def test_tap_module_inputs_taps_a_model_without_editing_it():
  class Plain(nn.Module):  # No tap calls anywhere.
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
      return nn.Dense(3)(h)

  model = Plain()
  x = jax.random.uniform(jax.random.key(0), (4, 1, 2, 3))
  y = jnp.array([0, 1, 2, 0])
  with tap_module_inputs(["Dense_0", "Dense_1"]):
    params = model.init(jax.random.key(1), x)["params"]
    taps = zero_taps(model.apply, {"params": params}, x)
    chex.assert_trees_all_equal_shapes(taps, {"Dense_0": {"input": jnp.zeros((4, 6))},
                                              "Dense_1": {"input": jnp.zeros((4, 5))}})
    _, aux = gfa_objective(model.apply, params, x, y, mse_loss, layers=["Dense_0"])
  # Dense_0's input is x itself (flattened): its alignment is the mean cosine of dL/dx with x.
  grad_x = jax.grad(lambda x: mse_loss(model.apply({"params": params}, x), y))(x)
  np.testing.assert_allclose(aux["alignment"]["Dense_0"]["input"],
                             jnp.mean(per_sample_cosine(grad_x, x)), rtol=1e-5)


def test_readme_example_runs():
  import re
  from tests.conftest import REPO
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  example = next(b for b in blocks if "tap_module_inputs" in b)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)
  chex.assert_tree_all_finite(namespace["grads"])
  assert float(jnp.abs(namespace["grads"]["conv1"]["kernel"]).sum()) > 0


# --- The paper's readings: detached gradient, anti-alignment, sum over layers ---------------


def _two_layer_linear(w1, w2, x, taps):
  """h = x W1 (tapped), logits = h W2, L = mean squared logits; returns (L, {'h': h})."""
  h = x @ w1 + taps["h"]
  return jnp.mean(jnp.sum((h @ w2) ** 2, axis=-1)), {"h": h}


def test_detached_gradient_trains_only_through_the_features():
  """Detached: d(1 - cos(g, h))/dW with g = dL/dh held constant, derived by hand."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w1, w2 = jax.random.normal(k1, (5, 4)), jax.random.normal(k2, (4, 3))
  x = jax.random.normal(k3, (6, 5))
  taps = {"h": jnp.zeros((6, 4))}

  def penalty(w1, w2, gradient):
    return gfa_penalty(lambda t: _two_layer_linear(w1, w2, x, t), taps, gradient=gradient)[0]

  dw1, dw2 = jax.grad(penalty, argnums=(0, 1))(w1, w2, "detached")
  # By hand: g_i = dL/dh_i is a constant; d(-cos_i)/dh_i = -(g_i/(|g||h|) - cos_i h_i/|h|^2),
  # averaged over the batch, then through h = x W1. W2 enters only through g: no gradient.
  h = x @ w1
  g = jax.grad(lambda h: jnp.mean(jnp.sum((h @ w2) ** 2, axis=-1)))(h)
  gn, hn = jnp.linalg.norm(g, axis=1, keepdims=True), jnp.linalg.norm(h, axis=1, keepdims=True)
  cos = jnp.sum(g * h, axis=1, keepdims=True) / (gn * hn)
  dh = -(g / (gn * hn) - cos * h / hn**2) / x.shape[0]
  chex.assert_trees_all_close(dw1, x.T @ dh, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(dw2, jnp.zeros_like(w2))
  # The exact gradient differs: it also moves W2 (through g) and W1 through g's dependence on h.
  ew1, ew2 = jax.grad(penalty, argnums=(0, 1))(w1, w2, "exact")
  assert float(jnp.abs(ew2).max()) > 1e-3
  assert float(jnp.abs(ew1 - dw1).max()) > 1e-4
  # The value is the same: only the gradient is detached.
  np.testing.assert_allclose(penalty(w1, w2, "exact"), penalty(w1, w2, "detached"), rtol=1e-6)


def test_detached_first_has_no_parameter_gradient():
  """FIRST taps the input, which no parameter produces: a detached penalty trains nothing."""
  model, params, x, y = setup()
  ce = mse_loss

  def penalty(params, gradient):
    return gfa_objective(model.apply, params, x, y, ce, layers=("layer0",), alpha=0.0,
                         gradient=gradient)[0]

  detached = jax.grad(penalty)(params, "detached")
  chex.assert_trees_all_close(detached, jax.tree.map(jnp.zeros_like, detached))
  exact = jax.grad(penalty)(params, "exact")
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(exact)) > 1e-4


def test_anti_direction_is_the_literal_formula_and_sum_adds_the_layers():
  model, params, x, y = setup()
  ce = mse_loss
  layers = ("layer0", "layer1")
  run = lambda **kw: gfa_objective(model.apply, params, x, y, ce, layers=layers, alpha=1.0,
                                   beta=0.5, **kw)
  align, aux = run()
  anti, anti_aux = run(direction="anti")
  summed, sum_aux = run(reduction="sum")
  misalignment = [1.0 - aux["alignment"][name] for name in layers]
  # alpha * L - beta * (1 - cos): the penalty is the negated mean misalignment.
  np.testing.assert_allclose(anti_aux["penalty"], -np.mean(misalignment), rtol=1e-6)
  np.testing.assert_allclose(anti, aux["task_loss"] - 0.5 * np.mean(misalignment), rtol=1e-6)
  np.testing.assert_allclose(sum_aux["penalty"], np.sum(misalignment), rtol=1e-6)
  np.testing.assert_allclose(align, aux["task_loss"] + 0.5 * np.mean(misalignment), rtol=1e-6)
  # Minimising the anti penalty lowers the cosine: one gradient step on the features' weights.
  grad = jax.grad(lambda p: gfa_objective(model.apply, p, x, y, ce, layers=("layer1",),
                                          alpha=0.0, direction="anti")[0])(params)
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)
  before = gfa_objective(model.apply, params, x, y, ce, layers=("layer1",))[1]["alignment"]
  after = gfa_objective(model.apply, stepped, x, y, ce, layers=("layer1",))[1]["alignment"]
  assert float(after["layer1"]) < float(before["layer1"])


@pytest.mark.parametrize("kwargs, match", [
    ({"gradient": "stop"}, "gradient='stop'"), ({"direction": "-1"}, "direction='-1'"),
    ({"reduction": "max"}, "reduction='max'"), ({"eps": 0.0}, "eps must be > 0")])
def test_unknown_readings_and_zero_eps_are_clear_errors(kwargs, match):
  taps = {"h": jnp.zeros((2, 3))}
  loss_fn = lambda t: (jnp.sum((jnp.ones((2, 3)) + t["h"]) ** 2), {"h": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match=match):
    gfa_penalty(loss_fn, taps, **kwargs)


def test_a_tap_of_the_wrong_shape_names_the_layer():
  loss_fn = lambda t: (jnp.sum(t["layer7"]), {"layer7": jnp.ones((2, 4))})
  with pytest.raises(ValueError, match=r"tap \['layer7'\] has shape \(2, 3\)"):
    gfa_penalty(loss_fn, {"layer7": jnp.zeros((2, 3))})

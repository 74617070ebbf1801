"""Model shapes, the pinned parameter counts and the tap names GFA relies on."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from gfa_jax import gfa_objective, zero_taps
from gfa_jax.models import MLP, ResNet20, SmallCNN, create_model, init_params, max_pool_2x2
from gfa_jax.objectives import cross_entropy


def test_small_cnn_has_the_papers_parameter_count():
  params = init_params(SmallCNN(), jax.random.key(0), (32, 32, 3))
  assert sum(p.size for p in jax.tree.leaves(params)) == 620_362


def test_small_cnn_taps_are_the_layer_inputs_in_order():
  model = SmallCNN()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  params = init_params(model, jax.random.key(1), (32, 32, 3))
  taps = zero_taps(model.apply, {"params": params}, x)
  chex.assert_trees_all_equal_shapes(taps, {
      "layer0": jnp.zeros((2, 32, 32, 3)), "layer1": jnp.zeros((2, 16, 16, 32)),
      "layer2": jnp.zeros((2, 8, 8, 64)), "layer3": jnp.zeros((2, 2048)),
      "layer4": jnp.zeros((2, 256))})
  assert list(zero_taps(model.apply, {"params": params}, x, names=("layer0",))) == ["layer0"]
  # layer0 is the image the first convolution sees: [0, 1] scaled to [-1, 1] by default.
  _, state = model.apply({"params": params}, x, mutable=["intermediates"])
  np.testing.assert_allclose(state["intermediates"]["layer0"], 2 * x - 1, atol=1e-6)


def test_unknown_tap_name_is_a_clear_error():
  model = MLP()
  x = jnp.zeros((1, 32, 32, 3))
  params = init_params(model, jax.random.key(0), (32, 32, 3))
  with pytest.raises(ValueError, match="unknown tap names"):
    zero_taps(model.apply, {"params": params}, x, names=("layer9",))


def test_max_pool_matches_flax():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


def test_mlp_logits_and_registry():
  model = create_model("mlp", hidden=[8, 8, 8])
  params = init_params(model, jax.random.key(0), (32, 32, 3))
  chex.assert_shape(model.apply({"params": params}, jnp.zeros((5, 32, 32, 3))), (5, 10))
  with pytest.raises(ValueError, match="unknown model"):
    create_model("resnet9000")
  # An MLP config switched to another model on the command line keeps MLP's fields.
  with pytest.raises(ValueError, match=r"'resnet20' has no field\(s\) \['hidden'\]"):
    create_model("resnet20", hidden=[8, 8, 8])


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, (7, 6)), (5, 1, (7, 6)),
                                                     (3, 2, (8, 6)), (5, 2, (8, 4)),
                                                     (3, 3, (9, 6)), (1, 2, (8, 6)),
                                                     (3, 2, (7, 5))])
def test_conv_same_matches_lax_to_third_order(kernel_size, stride, size):
  """conv_same (conv_same_subsampled for a stride: its input gradient by phases, some of which
  no tap reaches when the kernel is smaller than the stride, or spread on the stride-1 grid
  when the stride does not divide the image) only rewrite the derivative
  program: values, gradients, and the gradient of a function of the input gradient (what GFA
  differentiates) must equal lax's convolution with torch's padding k // 2."""
  from gfa_jax.models import conv_same, conv_same_subsampled

  pad = [(kernel_size // 2,) * 2] * 2
  lax_conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = conv_same if stride == 1 else (lambda x, k: conv_same_subsampled(x, k, stride))
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 3, 4))

  def alignment_like(conv, kernel, x):
    g = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, kernel)) ** 2))(x)
    return jnp.sum(g * x) / (jnp.linalg.norm(g) + 1.0)

  second = lambda conv, kernel: jax.grad(alignment_like, argnums=(1, 2))(conv, kernel, x)
  third = lambda conv: jax.grad(lambda k: jnp.sum(second(conv, k)[0] ** 2))(kernel)
  np.testing.assert_allclose(ours(x, kernel), lax_conv(x, kernel), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(second(ours, kernel), second(lax_conv, kernel),
                              rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(third(ours), third(lax_conv), rtol=1e-3, atol=1e-4)


def test_small_cnn_rejects_a_convolution_conv_same_does_not_serve():
  from gfa_jax.models import conv_same_for_flax

  conv = nn.Conv(4, (3, 3), strides=2, padding="SAME", conv_general_dilated=conv_same_for_flax)
  with pytest.raises(ValueError, match="stride-1 'SAME'"):
    conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_small_cnn_without_explicit_conv_vjp_is_the_same_function_and_supports_jvp():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  params = init_params(SmallCNN(), jax.random.key(1), (32, 32, 3))
  logits = lambda model: lambda x: model.apply({"params": params}, x)
  fast, plain = logits(SmallCNN()), logits(SmallCNN(explicit_conv_vjp=False))
  np.testing.assert_allclose(fast(x), plain(x), rtol=1e-5, atol=1e-6)
  input_gradient = lambda f: jax.grad(lambda x: jnp.sum(f(x)[:, 3]))(x)
  np.testing.assert_allclose(input_gradient(fast), input_gradient(plain), rtol=1e-4, atol=1e-6)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(fast, (x,), (x,))
  chex.assert_shape(jax.jvp(plain, (x,), (x,))[1], (2, 10))


# --- ResNet20 and ViT --------------------------------------------------------------------------


def test_resnet20_and_vit_parameter_counts():
  count = lambda model: sum(p.size for p in jax.tree.leaves(jax.eval_shape(
      lambda: init_params(model, jax.random.key(0), (32, 32, 3)))))
  # ResNet20 with option-A shortcuts: 0.27 M as in He et al.; GroupNorm adds 2 per channel.
  assert count(create_model("resnet20")) == 269_722
  assert count(create_model("vit")) == 545_930


@pytest.mark.parametrize("name, shapes", [
    ("resnet20", {"layer0": (32, 32, 3), **{f"layer{i}": (32, 32, 16) for i in (1, 2, 3, 4)},
                  **{f"layer{i}": (16, 16, 32) for i in (5, 6, 7)},
                  "layer8": (8, 8, 64), "layer9": (8, 8, 64), "layer10": (64,)}),
    ("vit", {"layer0": (32, 32, 3), **{f"layer{i}": (64, 128) for i in (1, 2, 3, 4)},
             "layer5": (128,)}),
])
def test_resnet20_and_vit_logits_and_taps(name, shapes):
  model = create_model(name, mean=[0.5] * 3, std=[0.5] * 3)  # as configs pass them
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  params = init_params(model, jax.random.key(1), (32, 32, 3))
  logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  taps = zero_taps(model.apply, {"params": params}, x)
  chex.assert_trees_all_equal_shapes(taps, {k: jnp.zeros((2, *s)) for k, s in shapes.items()})
  # layer0 is the normalised image the first layer sees, as for SmallCNN.
  np.testing.assert_allclose(state["intermediates"]["layer0"], 2 * x - 1, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vit"])
def test_resnet20_and_vit_gfa_objective_is_finite(name):
  model = create_model(name)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.array([0, 1, 2, 3])
  params = init_params(model, jax.random.key(1), (32, 32, 3))

  @jax.jit
  def objective_and_grad(params):
    return jax.value_and_grad(
        lambda p: gfa_objective(model.apply, p, x, y, cross_entropy,
                                layers=("layer0", "layer1", "layer2"), beta=1.0),
        has_aux=True)(params)

  (objective, aux), grads = objective_and_grad(params)
  chex.assert_tree_all_finite((objective, aux, grads))
  assert sorted(aux["alignment"]) == ["layer0", "layer1", "layer2"]
  assert 0.0 < float(aux["penalty"]) < 2.0
  assert float(optax.tree.norm(grads)) > 0


@pytest.mark.slow
def test_resnet20_layer0_alignment_is_zero_by_scale_invariance():
  # Bias-free conv + GroupNorm: L(c * h0) = L(h0), so <dL/dh0, h0> = 0 (docs/results.md).
  # layer1 feeds the identity shortcut too, so it is not invariant: its cosine is not 0.
  model = create_model("resnet20")
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  params = init_params(model, jax.random.key(1), (32, 32, 3))
  _, aux = gfa_objective(model.apply, params, x, jnp.array([0, 1, 2, 3]), cross_entropy,
                         layers=("layer0", "layer1"))
  assert abs(float(aux["alignment"]["layer0"])) < 1e-4
  assert abs(float(aux["alignment"]["layer1"])) > 1e-3


@pytest.mark.parametrize("name", ["resnet20", "vit"])
def test_resnet20_and_vit_treat_each_sample_on_its_own(name):
  """GFA's cosine is per sample: sample 0's logits must not depend on sample 1 (no BatchNorm)."""
  model = create_model(name)
  params = init_params(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
  changed = x.at[1].set(jax.random.uniform(jax.random.key(2), (32, 32, 3)))
  before = model.apply({"params": params}, x)
  after = model.apply({"params": params}, changed)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(after[2], before[2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(after[1], before[1])


@pytest.mark.slow
def test_resnet20_without_explicit_conv_vjp_is_the_same_function():
  """Stride-2 convolutions via conv_same + subsampling equal lax's padding-1 strided ones."""
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  params = init_params(ResNet20(), jax.random.key(1), (32, 32, 3))
  plain_params = init_params(ResNet20(explicit_conv_vjp=False), jax.random.key(1), (32, 32, 3))
  chex.assert_trees_all_equal_shapes(params, plain_params)
  logits = lambda model: lambda x: model.apply({"params": params}, x)
  fast, plain = logits(ResNet20()), logits(ResNet20(explicit_conv_vjp=False))
  np.testing.assert_allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)
  input_gradient = lambda f: jax.grad(lambda x: jnp.sum(f(x)[:, 3]))(x)
  np.testing.assert_allclose(input_gradient(fast), input_gradient(plain), rtol=1e-3, atol=1e-6)

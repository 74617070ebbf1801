"""Each objective builds, differentiates, and reduces to its parts where it should."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import objectives
from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.models import MLP, create_model, init_params


@pytest.fixture
def setup(tiny_config):
  model = MLP(hidden=(16, 16, 16))
  params = init_params(model, jax.random.key(0), (32, 32, 3))
  batch = {"image": jax.random.uniform(jax.random.key(1), (8, 32, 32, 3)),
           "label": jnp.arange(8) % 10}
  return tiny_config, model, params, batch


@pytest.mark.parametrize("name", ["standard", "gfa", "pgd_at", "trades", "gradalign"])
def test_objective_has_finite_loss_and_gradient(setup, name):
  config, model, params, batch = setup
  config.objective = name
  objective = objectives.make_objective(config, model)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, batch, jax.random.key(2))
  assert np.isfinite(loss) and all(np.isfinite(v) for v in jax.tree.leaves(metrics))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert 0.0 <= metrics["accuracy"] <= 1.0


def test_gfa_with_beta_zero_is_the_task_loss(setup):
  config, model, params, batch = setup
  config.beta, config.alpha = 0.0, 1.0
  loss, metrics = objectives.make_objective(config, model)(params, batch, jax.random.key(0))
  config.objective = "standard"
  standard_loss, _ = objectives.make_objective(config, model)(params, batch, jax.random.key(0))
  np.testing.assert_allclose(loss, standard_loss, rtol=1e-6)
  assert set(metrics) >= {"penalty", "alignment/layer0", "alignment/layer1", "alignment/layer2"}


def test_beta_schedule_delays_then_ramps(tiny_config):
  tiny_config.beta, tiny_config.beta_ramp_start_epochs, tiny_config.beta_ramp_epochs = 0.4, 1.0, 2.0
  schedule = objectives.make_beta_schedule(tiny_config, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(s) for s in (0, 10, 20, 30, 100)],
                             [0.0, 0.0, 0.2, 0.4, 0.4], atol=1e-7)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    objectives.make_beta_schedule(tiny_config, steps_per_epoch=None)


def test_gfa_uses_the_batch_step_for_beta(setup):
  config, model, params, batch = setup
  config.beta, config.beta_ramp_start_epochs, config.beta_ramp_epochs = 0.5, 1.0, 1.0
  objective = objectives.make_objective(config, model, steps_per_epoch=4)
  early, early_metrics = objective(params, {**batch, "step": jnp.asarray(0)}, jax.random.key(0))
  late, late_metrics = objective(params, {**batch, "step": jnp.asarray(8)}, jax.random.key(0))
  evaluation, _ = objective(params, batch, jax.random.key(0))  # No step: the final beta.
  np.testing.assert_allclose(early, early_metrics["task_loss"], rtol=1e-6)
  np.testing.assert_allclose(late, late_metrics["task_loss"] + 0.5 * late_metrics["penalty"], rtol=1e-6)
  np.testing.assert_allclose(evaluation, late, rtol=1e-6)
  assert early_metrics["beta"] == 0.0 and late_metrics["beta"] == 0.5


def test_per_layer_beta_weighs_each_layers_misalignment(setup):
  config, model, params, batch = setup
  config.beta = 0.5
  config.gfa_layer_weights = (2.0, 0.0, 1.0)  # layer0 twice, layer1 not at all.
  loss, metrics = objectives.make_objective(config, model)(params, batch, jax.random.key(0))
  misaligned = [1 - metrics[f"alignment/layer{i}"] for i in range(3)]
  np.testing.assert_allclose(metrics["penalty"], (2 * misaligned[0] + misaligned[2]) / 3, rtol=1e-6)
  np.testing.assert_allclose(loss, metrics["task_loss"] + 0.5 * metrics["penalty"], rtol=1e-6)
  config.gfa_layer_weights = (1.0, 1.0)  # One weight short.
  with pytest.raises(ValueError, match="one weight >= 0 per layer"):
    objectives.make_objective(config, model)


def test_trades_with_zero_weight_is_the_clean_loss(setup):
  config, model, params, batch = setup
  config.objective, config.task_loss, config.adversary.trades_beta = "trades", "ce", 0.0
  loss, _ = objectives.make_objective(config, model)(params, batch, jax.random.key(0))
  logits = model.apply({"params": params}, batch["image"])
  np.testing.assert_allclose(loss, objectives.cross_entropy(logits, batch["label"]), rtol=1e-6)


def test_gradalign_with_zero_weight_is_the_fgsm_loss(setup):
  config, model, params, batch = setup
  config.objective, config.task_loss, config.adversary.gradalign_lambda = "gradalign", "ce", 0.0
  loss, metrics = objectives.make_objective(config, model)(params, batch, jax.random.key(0))
  logits_fn = lambda x: model.apply({"params": params}, x)
  x_adv = fgsm(logits_fn, batch["image"], batch["label"], eps=config.adversary.eps)
  np.testing.assert_allclose(
      loss, objectives.cross_entropy(logits_fn(x_adv), batch["label"]), rtol=1e-5)
  assert 0.0 <= metrics["penalty"] <= 2.0


def test_mse_compares_softmax_or_logits_with_one_hot():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  labels = jnp.array([0, 1])
  probs = jax.nn.softmax(logits)
  expected = np.mean((np.asarray(probs) - np.eye(2)[[0, 1]]) ** 2)
  np.testing.assert_allclose(objectives.mse("softmax")(logits, labels), expected, rtol=1e-6)
  np.testing.assert_allclose(objectives.mse("logits")(logits, labels),
                             np.mean((np.asarray(logits) - np.eye(2)) ** 2), rtol=1e-6)
  with pytest.raises(ValueError, match="mse_outputs"):
    objectives.mse("probits")


def test_unknown_objective_is_a_clear_error(setup):
  config, model, _, _ = setup
  config.objective = "magic"
  with pytest.raises(ValueError, match="unknown objective 'magic'"):
    objectives.make_objective(config, model)


@pytest.mark.parametrize("name, constant", [("small_cnn", []), ("resnet20", ["layer0"])])
def test_constant_penalty_layers_finds_scale_invariant_taps(tiny_config, name, constant):
  # ResNet-20's first conv has no bias and feeds GroupNorm: its input's cosine is 0 for any
  # parameters. SmallCNN's layers have biases, so every DEEP tap can align.
  tiny_config.gfa_layers = ("layer0", "layer1", "layer2")
  model = create_model(name)
  params = init_params(model, jax.random.key(0), (32, 32, 3))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  assert objectives.constant_penalty_layers(
      tiny_config, model, params, images, jnp.arange(4)) == constant


def test_detached_first_trains_like_the_task_loss_alone(setup):
  """config.gfa_gradient='detached' reaches the penalty: on FIRST (the input, a constant) the
  penalty has no parameter gradient, so the step is the task loss's."""
  config, model, params, batch = setup
  config.beta, config.gfa_layers, config.gfa_gradient = 0.7, ("layer0",), "detached"
  grad = lambda c: jax.grad(lambda p: objectives.make_objective(c, model)(p, batch, None)[0])(params)
  detached = grad(config)
  config.objective = "standard"
  chex.assert_trees_all_close(detached, grad(config), rtol=1e-5, atol=1e-7)
  config.objective, config.gfa_gradient = "gfa", "exact"
  assert not all(np.allclose(a, b, atol=1e-7) for a, b in
                 zip(jax.tree.leaves(grad(config)), jax.tree.leaves(detached)))


def test_anti_direction_and_sum_reach_the_objective(setup):
  config, model, params, batch = setup
  config.beta = 0.5
  align = objectives.make_objective(config, model)(params, batch, None)[1]
  config.gfa_direction, config.gfa_reduction = "anti", "sum"
  anti_sum = objectives.make_objective(config, model)(params, batch, None)[1]
  np.testing.assert_allclose(anti_sum["penalty"], -3 * align["penalty"], rtol=1e-5)

"""gfa_jax.analysis on models whose geometry is known: a loss that depends on a layer input h
only through ||h|| has a purely radial gradient there, one that depends only on h/||h|| a purely
tangential one."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import analysis, plots, reporting, tap
from gfa_jax.objectives import cross_entropy

NUM_CLASSES = 3


class NormNet(nn.Module):
  """layer0 = the image (flat), layer1 = tanh features; the logits see layer1 only through its
  norm (radial) or only through its direction (angular)."""
  angular: bool = False

  @nn.compact
  def __call__(self, x):
    h = tap(self, "layer0", x.reshape(x.shape[0], -1) - 0.5)
    h = tap(self, "layer1", jnp.tanh(nn.Dense(6)(h)))
    norm = jnp.sqrt(jnp.sum(h * h, axis=1, keepdims=True))
    features = h / norm if self.angular else jnp.concatenate([norm, norm ** 2], axis=1)
    return nn.Dense(NUM_CLASSES)(features)


def setup(angular=False, n=8):
  model = NormNet(angular=angular)
  x = jax.random.uniform(jax.random.key(0), (n, 2, 2, 3))
  variables = model.init(jax.random.key(1), x)
  y = jnp.arange(n) % NUM_CLASSES
  return model.apply, variables, np.asarray(x), np.asarray(y)


def test_radial_loss_has_zero_tangential_derivative():
  apply_fn, variables, x, y = setup()
  result = analysis.radial_tangential(apply_fn, variables, x, y, layers=("layer0", "layer1"),
                                      pgd_layer="layer1", return_per_example=True)
  per = result["per_example"]["layers"]
  radial, tangential = np.abs(per["layer1"]["radial_derivative"]), per["layer1"][
      "tangential_derivative"]
  assert np.all(radial > 1e-4)
  np.testing.assert_array_less(tangential, 1e-5 * radial)
  np.testing.assert_allclose(np.abs(per["layer1"]["cosine"]), 1.0, atol=1e-5)
  # One layer down the gradient is not radial: the test can tell layers apart.
  assert np.median(per["layer0"]["tangential_derivative"]) > 0.1 * np.median(
      np.abs(per["layer0"]["radial_derivative"]))
  # At equal steps the tangential move changes ||h|| only to second order.
  change = result["layers"]["layer1"]["loss_change"]["0.01"]
  assert change["tangential"]["max"] < 0.05 * change["radial"]["min"]
  assert change["tangential_larger"] == 0.0
  pgd = result["pgd"]
  assert pgd["radial"]["loss_increase"]["mean"] > 10 * pgd["tangential"]["loss_increase"]["mean"]
  assert pgd["full"]["loss_increase"]["mean"] >= pgd["radial"]["loss_increase"]["mean"] - 1e-6
  json.dumps({k: v for k, v in result.items() if k != "per_example"}, allow_nan=False)


def test_angular_loss_has_zero_radial_derivative():
  apply_fn, variables, x, y = setup(angular=True)
  result = analysis.radial_tangential(apply_fn, variables, x, y, layers=("layer1",),
                                      pgd_layer=None, return_per_example=True)
  per = result["per_example"]["layers"]["layer1"]
  assert np.all(per["tangential_derivative"] > 1e-4)
  np.testing.assert_array_less(np.abs(per["radial_derivative"]),
                               1e-5 * per["tangential_derivative"])
  assert result["layers"]["layer1"]["loss_change"]["0.1"]["tangential_larger"] == 1.0
  assert "pgd" not in result


def test_landscape_grid_is_centred_and_symmetric_for_a_radial_loss(tmp_path):
  apply_fn, variables, x, y = setup(n=4)
  png = tmp_path / "landscape.png"
  land = analysis.loss_landscape(apply_fn, variables, x, y, key=jax.random.key(0),
                                 layer="layer1", num=5, extent=0.2, random_planes=2)
  assert set(land["planes"]) == {"radial_tangential", "random_0", "random_1"}
  assert land["coordinates"] == pytest.approx([-0.2, -0.1, 0.0, 0.1, 0.2])
  clean = np.asarray(land["clean_loss"])
  for plane in land["planes"].values():
    grid = np.asarray(plane["loss"])
    assert grid.shape == (4, 5, 5)
    np.testing.assert_allclose(grid[:, 2, 2], clean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plane["mean_loss"]), grid.mean(0), rtol=1e-6)
  grid = np.asarray(land["planes"]["radial_tangential"]["loss"])
  # Moving by +-b orthogonally to h gives the same ||h||, hence the same loss; radially it
  # does not.
  np.testing.assert_allclose(grid[:, 2, :], grid[:, 2, ::-1], rtol=1e-5)
  assert np.abs(grid[:, :, 2] - grid[:, ::-1, 2]).max() > 1e-3
  json.dumps(land, allow_nan=False)
  plots.plot_landscapes(png, {"model": land})
  assert png.stat().st_size > 10_000


def test_alignment_table_agrees_with_per_example_cosines():
  apply_fn, variables, x, y = setup()
  table = analysis.alignment_table(apply_fn, variables, {"test": (x, y), "first": (x[:3], y[:3])},
                                   cross_entropy, batch_size=3)
  assert list(table) == ["test", "first"] and list(table["test"]) == ["layer0", "layer1"]
  per = analysis.radial_tangential(apply_fn, variables, x, y, layers=("layer0", "layer1"),
                                   pgd_layer=None, return_per_example=True)["per_example"]
  for layer in ("layer0", "layer1"):
    cosine = per["layers"][layer]["cosine"]
    assert table["test"][layer] == pytest.approx(cosine.mean(), abs=1e-5)
    assert table["first"][layer] == pytest.approx(cosine[:3].mean(), abs=1e-5)
  markdown = reporting.alignment_markdown(table)
  assert markdown.splitlines()[0] == "| split | layer0 | layer1 |"


@pytest.mark.slow
def test_alignment_table_runs_a_batchnorm_model_on_its_running_averages():
  """A model with batch_stats (a trained or imported BatchNorm network) is measured in
  inference mode: an image's cosine is the same alone as in a batch."""
  from gfa_jax import models
  model = models.create_model("wrn", depth=10, width=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  y = np.arange(4) % 10
  batched = analysis.alignment_table(model.apply, variables, {"all": (x, y)}, cross_entropy,
                                     layers=("layer1",), batch_size=4)
  alone = analysis.alignment_table(model.apply, variables, {"all": (x, y)}, cross_entropy,
                                   layers=("layer1",), batch_size=1)
  assert np.isfinite(batched["all"]["layer1"])
  assert batched["all"]["layer1"] == pytest.approx(alone["all"]["layer1"], abs=1e-5)


def test_unknown_layer_is_a_clear_error():
  apply_fn, variables, x, y = setup(n=2)
  with pytest.raises(ValueError, match=r"unknown layers \['layer7'\].*layer0"):
    analysis.radial_tangential(apply_fn, variables, x, y, layers=("layer7",))
  with pytest.raises(ValueError, match="no tapped layer"):
    plain = lambda v, x, mutable=(): (x.reshape(len(x), -1)[:, :3], {})
    analysis.loss_landscape(plain, {}, x, y, key=jax.random.key(0))

"""adapters.as_model and gfa_jax.robustness: any model, one entry point, weights traced."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import gfa_jax
from gfa_jax import adapters, batching, evaluate
from gfa_jax.attacks import core as attack_core

SHAPE = (8, 8, 3)


def images(n=6, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(np.float32)


class NNXNet(nnx.Module):
  """Conv, BatchNorm, Dropout, Dense: every layer whose behaviour depends on the mode."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.fc(h.mean((1, 2)))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(10)(h.mean((1, 2)))


def nnx_net(seed):
  net = NNXNet(nnx.Rngs(seed))
  # Running statistics away from (0, 1), so eval mode and train mode give different logits.
  net.bn.mean[...] = jnp.full((4,), 0.3)
  net.bn.var[...] = jnp.full((4,), 2.0)
  return net


def linen_variables(seed):
  variables = LinenNet().init(jax.random.key(seed), images(1))
  stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


def compiled():
  return attack_core._attack_batch._cache_size(), batching._predict_batch._cache_size()


def attack(model, x):
  """APGD on x with the model's own predictions as labels (every point attacked)."""
  y = batching.predict(model.logits_fn, x, 8)
  return gfa_jax.robustness(model, x, y, attack="apgd", eps=8 / 255, batch_size=8,
                            overrides={"steps": 3}, progress=False)


def test_a_plain_function_gives_evaluate_s_result():
  w = jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), 10))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = images(8)
  y = np.asarray(logits_fn(x)).argmax(1)
  report = gfa_jax.robustness(logits_fn, x, y, attack="fgsm", eps=[0.01, 0.1], progress=False)
  direct = evaluate.evaluate(logits_fn, x, y, attack="fgsm", eps=[0.01, 0.1], progress=False)
  assert report["still_robust"] == direct["still_robust"]
  assert report["robust_accuracy"] == direct["robust_accuracy"]
  assert report["clean_accuracy"] == 1.0 and report["eps"] == [0.01, 0.1]
  model = gfa_jax.as_model(logits_fn, label="linear")
  assert model.label == "linear" and adapters.as_model(model) is model
  chex.assert_trees_all_close(model.logits_fn(x), logits_fn(x))


def test_an_nnx_module_is_evaluated_in_eval_mode_and_left_as_it_was():
  net = nnx_net(0)
  model = gfa_jax.as_model(net)
  x = images()
  net.eval()
  expected = net(x)
  chex.assert_trees_all_close(model.logits_fn(x), expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.jit(model.logits_fn)(x), expected, rtol=1e-5, atol=1e-6)
  net.train()
  assert not net.drop.deterministic  # the view did not switch the user's module
  model = gfa_jax.as_model(net)  # built from a module in train mode: still eval mode
  chex.assert_trees_all_close(model.logits_fn(x), expected, rtol=1e-5, atol=1e-6)
  assert model.label == "NNXNet"


def test_a_second_nnx_model_of_the_same_architecture_compiles_nothing_new():
  x = images()
  first = attack(gfa_jax.as_model(nnx_net(0)), x)
  sizes = compiled()
  second = attack(gfa_jax.as_model(nnx_net(1)), x)
  assert compiled() == sizes
  assert first["clean_accuracy"] == second["clean_accuracy"] == 1.0
  assert 0.0 <= second["robust_accuracy"][0] <= 1.0


@pytest.mark.parametrize("form", ["module", "bound_apply", "pair"])
def test_a_second_linen_model_of_the_same_architecture_compiles_nothing_new(form):
  """A Linen module, its bound apply or an (apply, variables) pair: each instance of the
  module is a new object, yet the compiled attacks are reused."""
  def model(seed):
    net = LinenNet()  # a fresh instance each time, as a user's script would make
    variables = linen_variables(seed)
    if form == "module":
      return gfa_jax.as_model(net, variables, apply_kwargs={"train": False})
    if form == "bound_apply":
      return gfa_jax.as_model(net.apply, variables, apply_kwargs={"train": False})
    return gfa_jax.as_model((net.apply, variables))

  x = images()
  first = model(0)
  chex.assert_trees_all_close(first.logits_fn(x),
                              LinenNet().apply(linen_variables(0), x, train=False))
  attack(first, x)
  sizes = compiled()
  report = attack(model(1), x)
  assert compiled() == sizes
  assert report["clean_accuracy"] == 1.0


def test_linen_apply_kwargs_reach_the_model_and_extra_keywords_pass_through():
  variables = linen_variables(0)
  x = images()
  model = gfa_jax.as_model(LinenNet(), variables, apply_kwargs={"train": False})
  # With train=False the stored statistics are used; the analyses' mutable= still passes.
  logits, state = model.apply_fn(variables, x, mutable=["intermediates"])
  chex.assert_trees_all_close(logits, LinenNet().apply(variables, x, train=False))
  assert state == {}
  train_mode = gfa_jax.as_model(LinenNet(), variables, apply_kwargs={"train": True})
  with pytest.raises(Exception, match="batch_stats"):  # train mode wants a mutable collection
    train_mode.logits_fn(x)


def test_bad_models_and_options_are_refused_in_one_line():
  variables = linen_variables(0)
  with pytest.raises(ValueError, match="without variables"):
    gfa_jax.as_model(nnx_net(0), variables)
  with pytest.raises(ValueError, match="'params' entry"):
    gfa_jax.as_model(LinenNet(), variables["params"])
  with pytest.raises(ValueError, match="'params' entry"):
    gfa_jax.as_model(LinenNet())
  with pytest.raises(ValueError, match="'params' entry"):
    gfa_jax.as_model(LinenNet().apply)  # not a logits function: its variables are missing
  with pytest.raises(TypeError, match="got ndarray"):
    gfa_jax.as_model(np.zeros(3))
  with pytest.raises(ValueError, match="hashable"):
    gfa_jax.as_model(LinenNet(), variables, apply_kwargs={"train": [False]})
  x, y = images(2), np.zeros(2, int)
  with pytest.raises(ValueError, match=r"unknown options \['step'\]"):
    gfa_jax.robustness(lambda v: v.reshape(2, -1)[:, :10], x, y, step=3)


def test_robustness_reaches_the_analyses_through_the_evaluators():
  """The checklist and mechanism evaluators take the same Model (running them is
  test_checklist's and test_analysis's job); a model without Linen taps is refused by the
  analyses, and alignment, which compares train and test images, names the path that serves
  both splits."""
  x, y = images(4), np.zeros(4, int)
  model = gfa_jax.as_model(LinenNet(), linen_variables(0), label="linen")
  with pytest.raises(ValueError, match="same name as --workdir"):
    gfa_jax.robustness(model, x, y, attack="mechanism", compare=model)
  fn = lambda v: v.reshape(v.shape[0], -1)[:, :10]
  with pytest.raises(ValueError, match="is a plain logits function"):
    gfa_jax.robustness(fn, x, y, attack="mechanism")
  with pytest.raises(ValueError, match="is an NNX module"):
    gfa_jax.robustness(model, x, y, attack="mechanism", compare=nnx_net(0))
  with pytest.raises(ValueError, match="checklist takes one --eps"):
    gfa_jax.robustness(fn, x, y, attack="checklist", eps=[0.1, 0.2])
  with pytest.raises(ValueError, match="task loss linen was trained with"):
    gfa_jax.robustness(model, x, y, attack="alignment")
  model = dataclasses.replace(model, config=ml_collections.ConfigDict({"task_loss": "ce"}))
  with pytest.raises(ValueError, match=r"evaluators.get\('alignment'\)"):
    gfa_jax.robustness(model, x, y, attack="alignment")


def test_two_torch_checkpoints_of_one_arch_give_equal_functions(tmp_path, monkeypatch):
  """evaluators.load_model(torch_arch=...) goes through as_model: the imported module is built
  anew per file, yet the two Models' functions compare (and hash) equal, which is what the jit
  caches key on; only their variables differ."""
  torch = pytest.importorskip("torch")
  from tests import torch_archs
  from gfa_jax import evaluators, torch_import
  arch = torch_import.ARCHS["wrn-28-10"]
  monkeypatch.setitem(torch_import.ARCHS, "wrn-28-10", functools.partial(arch, depth=10, width=1))
  models = []
  for seed in (0, 1):
    torch.manual_seed(seed)
    path = tmp_path / f"wrn{seed}.pt"
    torch.save(torch_archs.randomised(torch_archs.WideResNet(10, 1), seed).state_dict(), path)
    models.append(evaluators.load_model(path, torch_arch="wrn-28-10"))
  first, second = models
  assert first.apply_fn == second.apply_fn and hash(first.apply_fn) == hash(second.apply_fn)
  assert first.label == "wrn0" and first.config.data_source == "auto"
  kernels = [m.variables["params"]["conv1"]["kernel"] for m in models]
  assert kernels[0].shape == kernels[1].shape and not np.allclose(*kernels)

"""gfa_jax.load_torch_model: for every arch, logits equal the torch module's (written after the
published code in tests/torch_archs.py, random weights and BatchNorm statistics) whatever the
checkpoint's form, and bad files fail in one line naming the problem. The reference
AutoAttack's own trained ResNet-18 (pyautoattack/examples/model_test.pt) is checked too where
the [crosscheck] extra is installed.

The large layouts (WRN-70-16, WRN-34-20, DM-WRN-70-16) are checked at their full depth and a
small width (the key layout does not depend on the width); the forward passes run op by op
(no jit: compiling a 70-layer net would cost more than running it on two images).
"""

from pathlib import Path

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (pip install -e '.[crosscheck]')")

import gfa_jax  # noqa: E402
from gfa_jax import torch_import  # noqa: E402

from tests import torch_archs  # noqa: E402

# arch -> (torch twin, load options): every arch at its published depth, a small width.
CASES = {
    "resnet18": (lambda: torch_archs.ResNet18(width=8), {"width": 8}),
    "preact_resnet18": (lambda: torch_archs.ResNet18(preact=True, width=8), {"width": 8}),
    "wrn-28-10": (lambda: torch_archs.WideResNet(28, 1), {"width": 1}),
    "wrn-34-10": (lambda: torch_archs.WideResNet(34, 1, sub_block1=True), {"width": 1}),
    "wrn-34-20": (lambda: torch_archs.WideResNet(34, 2), {"width": 2}),
    "wrn-70-16": (lambda: torch_archs.WideResNet(70, 1), {"width": 1}),
    "dm-wrn-28-10": (lambda: torch_archs.DMWideResNet(depth=28, width=1), {"width": 1}),
    "dm-wrn-70-16": (lambda: torch_archs.DMWideResNet(depth=70, width=1, activation="relu"),
                     {"width": 1, "activation": "relu"}),
    "dm-preact-resnet18": (lambda: torch_archs.DMPreActResNet(width=4), {"width": 4}),
}

# The forms checkpoints come in: bare, wrapped, with DataParallel's / a wrapper's prefix.
FORMS = {
    "bare": lambda sd: sd,
    "state_dict+module.": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "last+model.": lambda sd: {"last": {f"model.{k}": v for k, v in sd.items()}},
    "module.model.": lambda sd: {f"module.model.{k}": v for k, v in sd.items()},
}


def _images(n=2, seed=1):
  return np.random.RandomState(seed).rand(n, 32, 32, 3).astype(np.float32)


def _torch_logits(net, x):
  with torch.no_grad():
    return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as error:
    call(*args, **kwargs)
  message = str(error.value)
  assert message and "\n" not in message, message
  return message


@pytest.mark.parametrize("arch", sorted(CASES))
def test_logits_equal_the_torch_module_in_every_checkpoint_form(arch, tmp_path):
  torch.manual_seed(0)
  make_net, options = CASES[arch]
  net = torch_archs.randomised(make_net())
  state = net.state_dict()
  x = _images()
  ref = _torch_logits(net, x)
  first = None
  for form, wrap in FORMS.items():
    path = tmp_path / f"{form}.pt"
    torch.save(wrap(state), path)
    apply_fn, variables = gfa_jax.load_torch_model(path, arch, **options)
    if first is None:  # the logits once; the other forms must give the same variables
      first = variables
      ours = np.asarray(apply_fn(variables, x))
      chex.assert_trees_all_close(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
    else:
      chex.assert_trees_all_equal(variables, first)
  n_torch = sum(v.numel() for k, v in state.items() if "sub_block1" not in k
                and "num_batches" not in k)
  assert sum(a.size for a in jax.tree.leaves(first)) == n_torch


def test_every_arch_name_gives_its_published_size():
  """The logits test covers one arch of each size family; the others differ only in depth and
  width, which their names must set."""
  for arch in torch_import.ARCHS:
    model = torch_import.build_model(arch)
    if "wrn-" in arch:
      depth, width = map(int, arch.rsplit("-", 2)[1:])
      assert (model.depth, model.width, model.activation) == (
          depth, width, "swish" if arch.startswith("dm-") else "relu"), arch
    else:
      assert model.width == 64, arch
  assert {type(torch_import.build_model(a)) for a in CASES} == {
      type(torch_import.build_model(a)) for a in torch_import.ARCHS}


def test_another_layout_does_not_load(tmp_path):
  """A mix-up of layouts or sizes fails loudly instead of giving wrong logits."""
  torch.manual_seed(0)
  path = tmp_path / "model.pt"
  torch.save(torch_archs.ResNet18(preact=True, width=8).state_dict(), path)
  message = _one_line_error(gfa_jax.load_torch_model, path, "resnet18", width=8)
  assert "does not fit arch 'resnet18'" in message and "missing: bn1.running_mean" in message
  torch.save(torch_archs.WideResNet(28, 1).state_dict(), path)
  message = _one_line_error(gfa_jax.load_torch_model, path, "wrn-34-10", width=1)
  assert "missing: block1.layer.4.bn1.running_mean" in message
  message = _one_line_error(gfa_jax.load_torch_model, path, "wrn-28-10")  # width 10
  assert "block1.layer.0.bn1." not in message  # bn1 sees the stem's 16 channels at any width
  assert "mis-shaped: block1.layer.0.bn2.running_mean (16,) (expected (160,))" in message
  message = _one_line_error(gfa_jax.load_torch_model, path, "dm-wrn-28-10", width=1)
  assert "missing: batchnorm.running_mean" in message and "unexpected: block1.layer.0.bn1.bias" in message


def test_bad_state_dicts_name_the_keys(tmp_path):
  torch.manual_seed(0)
  state = torch_archs.WideResNet(16, 1, sub_block1=True).state_dict()
  path = tmp_path / "sub_block1.pt"
  torch.save(state, path)
  gfa_jax.load_torch_model(path, "wrn-28-10", depth=16, width=1)  # sub_block1 ignored
  bad = dict(state)
  del bad["fc.weight"]
  bad["extra.weight"] = torch.zeros(3)
  bad["conv1.weight"] = torch.zeros(16, 3, 5, 5)
  torch.save(bad, path)
  message = _one_line_error(gfa_jax.load_torch_model, path, "wrn-28-10", depth=16, width=1)
  for part in ("missing: fc.weight", "unexpected: extra.weight",
               "mis-shaped: conv1.weight (16, 3, 5, 5) (expected (16, 3, 3, 3))"):
    assert part in message
  assert "sub_block1" not in message
  # Only the classic WideResNet's checkpoints carry sub_block1: elsewhere it is unexpected.
  dm_state = torch_archs.DMWideResNet(depth=10, width=1).state_dict()
  dm_state["sub_block1.layer.0.bn1.weight"] = torch.zeros(16)
  torch.save(dm_state, path)
  message = _one_line_error(gfa_jax.load_torch_model, path, "dm-wrn-28-10", depth=10, width=1)
  assert "unexpected: sub_block1.layer.0.bn1.weight" in message
  assert "unknown arch 'vgg16'" in _one_line_error(torch_import.convert_state_dict, {}, "vgg16")
  message = _one_line_error(gfa_jax.load_torch_model, path, "wrn-28-10", activaton="relu")
  assert "no option(s) ['activaton']" in message
  with pytest.raises(FileNotFoundError, match="no such file"):
    gfa_jax.load_torch_model(tmp_path / "absent.pt", "resnet18")
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  assert "weights_only" in _one_line_error(gfa_jax.load_torch_model, tmp_path / "junk.pt",
                                           "resnet18")
  (tmp_path / "empty.pt").write_bytes(b"")
  assert "empty" in _one_line_error(gfa_jax.load_torch_model, tmp_path / "empty.pt",
                                    "resnet18")
  torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
  assert "a state_dict" in _one_line_error(gfa_jax.load_torch_model,
                                           tmp_path / "no_tensors.pt", "resnet18")


def test_train_mode_matches_torch_train_mode():
  """``train=True`` normalises with the batch statistics and moves the running mean by torch's
  momentum 0.1, as torch's train(): the same module serves import and training."""
  torch.manual_seed(0)
  net = torch_archs.randomised(torch_archs.DMWideResNet(depth=10, width=1))
  state = {k: v.numpy().copy() for k, v in net.state_dict().items() if "num_batches" not in k}
  apply_fn, variables = torch_import.convert_state_dict(state, "dm-wrn-28-10", depth=10, width=1)
  x = _images(n=8, seed=3)
  net.train()
  ref = _torch_logits(net, x)
  ours, updated = apply_fn(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(np.asarray(ours), ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  # The running means moved as torch's did (torch's running variance uses the unbiased batch
  # variance, Flax's the biased one: they differ by n / (n - 1), so only the mean is compared).
  ours_mean = updated["batch_stats"]["batchnorm"]["mean"]
  chex.assert_trees_all_close(np.asarray(ours_mean), net.batchnorm.running_mean.numpy(),
                              atol=1e-5)
  assert not np.allclose(ours_mean, state["batchnorm.running_mean"])


def test_reference_resnet18_logits():
  pyautoattack = pytest.importorskip("pyautoattack", reason="needs the [crosscheck] extra")
  from pyautoattack.examples.resnet import ResNet18 as RefResNet18
  path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
  net = RefResNet18()
  net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  net.eval()
  apply_fn, variables = gfa_jax.load_torch_model(path, "resnet18")
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 11_173_962
  x = _images(n=8)
  ours, ref = np.asarray(jax.jit(apply_fn)(variables, x)), _torch_logits(net, x)
  chex.assert_trees_all_close(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_imported_models_carry_gfa_taps():
  """The imported model's taps: layer0 is the image, and GFA's cosine there is the cosine of
  the image with the loss's input gradient, computed here without the taps."""
  from gfa_jax import objectives, penalty
  net = torch_archs.randomised(torch_archs.ResNet18(width=8))
  state = {k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
  apply_fn, variables = torch_import.convert_state_dict(state, "resnet18", width=8)
  stats = variables["batch_stats"]
  fixed = lambda v, *a, **k: apply_fn({**v, "batch_stats": stats}, *a, **k)
  x = _images(n=3, seed=2)
  y = np.array([0, 4, 9])
  names = sorted(penalty.zero_taps(fixed, {"params": variables["params"]}, x))
  assert names == sorted(f"layer{i}" for i in range(10))
  # jitted: op by op, the double backward costs four times its compilation
  _, aux = jax.jit(lambda p: penalty.gfa_objective(fixed, p, x, y, objectives.cross_entropy,
                                                   layers=("layer0", "layer1", "layer2")))(
      variables["params"])
  grad = jax.jit(jax.grad(lambda x: objectives.cross_entropy(apply_fn(variables, x), y)))(x)
  chex.assert_trees_all_close(aux["cosines"]["layer0"], penalty.per_sample_cosine(grad, x),
                              atol=1e-5)
  assert all(np.isfinite(aux["alignment"][n]) for n in ("layer1", "layer2"))
  # A WideResNet's taps: the image, its 3n block inputs, the pooled features.
  wrn = torch_import.build_model("wrn-28-10", depth=10, width=1)
  variables = jax.eval_shape(wrn.init, jax.random.key(0), x)
  assert sorted(variables["perturbations"]) == sorted(f"layer{i}" for i in range(5))


def test_registry_models_are_the_imported_architectures():
  """``config.model.name = "wrn"`` builds the architecture the importer fills: the imported
  variables run in it unchanged (the same module serves import and training)."""
  from gfa_jax import models
  torch.manual_seed(0)
  net = torch_archs.randomised(torch_archs.WideResNet(16, 1))
  state = {k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
  apply_fn, variables = torch_import.convert_state_dict(state, "wrn-28-10", depth=16, width=1)
  model = models.from_config({"name": "wrn", "depth": 16, "width": 1})
  x = _images()
  chex.assert_trees_all_close(model.apply(variables, x), apply_fn(variables, x))
  assert models.from_config({"name": "dm_wrn", "depth": 16, "width": 1}).activation == "swish"
  with pytest.raises(ValueError, match="6n"):
    models.from_config({"name": "wrn", "depth": 20, "width": 1}).init(jax.random.key(0), x)


def test_pad_end_convolution_and_its_gradients_equal_lax():
  """DeepMind's stride-2 convolution padded (0, 1), as conv_same_subsampled of the flipped
  image: its values, input and kernel gradients equal lax's convolution with that padding."""
  from jax import lax

  from gfa_jax import models
  rng = np.random.RandomState(0)
  x, kernel = rng.randn(2, 8, 8, 3).astype(np.float32), rng.randn(3, 3, 3, 5).astype(np.float32)

  def ours(x, kernel):
    return models.conv_same_for_flax(x, kernel, (1, 1), "SAME", lhs_dilation=(1, 1),
                                     rhs_dilation=(1, 1), feature_group_count=1, precision=None,
                                     dimension_numbers=lax.conv_dimension_numbers(
                                         x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC")),
                                     subsample=2, pad_end=True)

  def theirs(x, kernel):
    return lax.conv_general_dilated(x, kernel, (2, 2), ((0, 1), (0, 1)), dimension_numbers=(
        "NHWC", "HWIO", "NHWC"))

  g = rng.randn(2, 4, 4, 5).astype(np.float32)
  loss = lambda f: lambda x, k: jax.numpy.sum(f(x, k) * g)
  chex.assert_trees_all_close(ours(x, kernel), theirs(x, kernel), atol=1e-5)
  chex.assert_trees_all_close(jax.grad(loss(ours), (0, 1))(x, kernel),
                              jax.grad(loss(theirs), (0, 1))(x, kernel), atol=1e-4)

"""gfa_jax.load_torch_model: logits equal the torch module's, and bad files fail in one line.

The torch modules are written here in the two layouts (Kuang Liu's ResNet-18, as in the
reference AutoAttack's examples/resnet.py, and RobustBench's PreActResNet18), randomly
initialised with non-trivial BatchNorm statistics; the reference's own trained ResNet-18
(pyautoattack/examples/model_test.pt) is checked too where the [crosscheck] extra is installed.
"""

from pathlib import Path

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (pip install -e '.[crosscheck]')")
nn, F = torch.nn, torch.nn.functional

import gfa_jax  # noqa: E402
from gfa_jax import torch_import  # noqa: E402


class Basic(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreAct(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class ResNet18(nn.Module):
  def __init__(self, preact=False):
    super().__init__()
    self.preact = preact
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    if not preact:
      self.bn1 = nn.BatchNorm2d(64)
    block, cin = (PreAct if preact else Basic), 64
    for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      setattr(self, f"layer{i}", nn.Sequential(block(cin, cout, stride), block(cout, cout, 1)))
      cin = cout
    if preact:
      self.bn = nn.BatchNorm2d(512)
    self.linear = nn.Linear(512, 10)

  def forward(self, x):
    out = self.conv1(x)
    if not self.preact:
      out = F.relu(self.bn1(out))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    if self.preact:
      out = F.relu(self.bn(out))
    return self.linear(F.avg_pool2d(out, 4).flatten(1))


def _randomised(net):
  """Random BatchNorm statistics and affine parameters, so that a wrong mapping shows."""
  gen = torch.Generator().manual_seed(0)
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
      m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
  return net.eval()


def _logits_both(net, apply_fn, variables, n=4):
  x = np.random.RandomState(1).rand(n, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return np.asarray(jax.jit(apply_fn)(variables, x)), ref


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18"])
def test_logits_equal_the_torch_module(arch, tmp_path):
  torch.manual_seed(0)
  net = _randomised(ResNet18(preact=arch == "preact_resnet18"))
  path = tmp_path / "model.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
  apply_fn, variables = gfa_jax.load_torch_model(path, arch)
  ours, ref = _logits_both(net, apply_fn, variables)
  chex.assert_trees_all_close(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  # And the other layout does not load: a mix-up fails loudly instead of giving wrong logits.
  other = "resnet18" if arch == "preact_resnet18" else "preact_resnet18"
  with pytest.raises(ValueError, match="does not fit arch"):
    gfa_jax.load_torch_model(path, other)


def test_reference_resnet18_logits():
  pyautoattack = pytest.importorskip("pyautoattack", reason="needs the [crosscheck] extra")
  from pyautoattack.examples.resnet import ResNet18 as RefResNet18
  path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
  net = RefResNet18()
  net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  net.eval()
  apply_fn, variables = gfa_jax.load_torch_model(path, "resnet18")
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 11_173_962
  ours, ref = _logits_both(net, apply_fn, variables, n=8)
  chex.assert_trees_all_close(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_bad_state_dicts_name_the_keys(tmp_path):
  torch.manual_seed(0)
  state = ResNet18().state_dict()
  bad = dict(state)
  del bad["linear.weight"]
  bad["extra.weight"] = torch.zeros(3)
  bad["conv1.weight"] = torch.zeros(64, 3, 5, 5)
  path = tmp_path / "bad.pt"
  torch.save(bad, path)
  with pytest.raises(ValueError) as error:
    gfa_jax.load_torch_model(path, "resnet18")
  message = str(error.value)
  for part in ("missing: linear.weight", "unexpected: extra.weight", "mis-shaped: conv1.weight"):
    assert part in message
  with pytest.raises(ValueError, match="unknown arch"):
    torch_import.convert_state_dict({}, "vgg16")
  with pytest.raises(FileNotFoundError, match="no such file"):
    gfa_jax.load_torch_model(tmp_path / "absent.pt", "resnet18")
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="weights_only"):
    gfa_jax.load_torch_model(tmp_path / "junk.pt", "resnet18")


def test_imported_resnet18_carries_gfa_taps():
  """The imported model's taps: layer0 is the image, and GFA's cosine there is the cosine of
  the image with the loss's input gradient, computed here without the taps."""
  from gfa_jax import objectives, penalty
  net = _randomised(ResNet18())
  state = {k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
  apply_fn, variables = torch_import.convert_state_dict(state, "resnet18")
  stats = variables["batch_stats"]
  fixed = lambda v, *a, **k: apply_fn({**v, "batch_stats": stats}, *a, **k)
  x = np.random.RandomState(2).rand(3, 32, 32, 3).astype(np.float32)
  y = np.array([0, 4, 9])
  names = sorted(penalty.zero_taps(fixed, {"params": variables["params"]}, x))
  assert names == sorted(f"layer{i}" for i in range(10))
  _, aux = penalty.gfa_objective(fixed, variables["params"], x, y, objectives.cross_entropy,
                                 layers=("layer0", "layer1", "layer2"))
  grad = jax.grad(lambda x: objectives.cross_entropy(apply_fn(variables, x), y))(x)
  chex.assert_trees_all_close(aux["cosines"]["layer0"], penalty.per_sample_cosine(grad, x),
                              atol=1e-5)
  assert all(np.isfinite(aux["alignment"][n]) for n in ("layer1", "layer2"))

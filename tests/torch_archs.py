"""PyTorch twins of the CIFAR-10 architectures gfa_jax.torch_import loads, written after the
published code (Kuang Liu's pytorch-cifar ResNet-18; RobustBench's PreActResNet18,
wide_resnet.py and dm_wide_resnet.py / dm_rn.py), with the same module names, so their
state_dicts have the published key layout. Depth and width are parameters, so the tests can
check the large layouts (WRN-70-16) at a small width; ``width`` of the ResNet-18s is the first
stage's channel count (64 published). Needs torch (the [crosscheck] extra)."""

import torch
from torch import nn
from torch.nn import functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # dm_wide_resnet.py's
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Basic(nn.Module):
  """pytorch-cifar's BasicBlock (post-activation; conv + BN shortcut)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreAct(nn.Module):
  """RobustBench's PreActBlock (a bare 1x1 conv shortcut of relu(bn1(x)))."""

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
  """pytorch-cifar's ResNet18, or with ``preact`` RobustBench's PreActResNet18."""

  def __init__(self, preact=False, width=64, num_classes=10):
    super().__init__()
    self.preact = preact
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    if not preact:
      self.bn1 = nn.BatchNorm2d(width)
    block, cin = (PreAct if preact else Basic), width
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
      setattr(self, f"layer{i}", nn.Sequential(block(cin, width * mult, stride),
                                               block(width * mult, width * mult, 1)))
      cin = width * mult
    if preact:
      self.bn = nn.BatchNorm2d(cin)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = self.conv1(x)
    if not self.preact:
      out = F.relu(self.bn1(out))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    if self.preact:
      out = F.relu(self.bn(out))
    return self.linear(F.avg_pool2d(out, 4).flatten(1))


class WideBasicBlock(nn.Module):
  """robustbench/model_zoo/architectures/wide_resnet.py's BasicBlock (dropRate 0)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equalInOut = in_planes == out_planes
    self.convShortcut = (None if self.equalInOut else
                         nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
    else:
      out = self.relu1(self.bn1(x))
    out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1)
                                 for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """RobustBench's classic WideResNet (after TRADES), ``sub_block1`` built but unused."""

  def __init__(self, depth=28, widen_factor=10, num_classes=10, sub_block1=False):
    super().__init__()
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
    if sub_block1:
      self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(channels[3], num_classes)
    self.nChannels = channels[3]

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    return self.fc(F.avg_pool2d(out, 8).view(-1, self.nChannels))


def _pad(x, stride):
  """dm_wide_resnet.py's manual 'SAME' padding of the 3x3 convolutions."""
  return F.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}


class DMBlock(nn.Module):
  """dm_wide_resnet.py's _Block."""

  def __init__(self, in_planes, out_planes, stride, activation_fn):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(in_planes)
    self.relu_0 = activation_fn()
    self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(out_planes)
    self.relu_1 = activation_fn()
    self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.has_shortcut = in_planes != out_planes
    self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
                     if self.has_shortcut else None)
    self._stride = stride

  def forward(self, x):
    if self.has_shortcut:
      x = self.relu_0(self.batchnorm_0(x))
    else:
      out = self.relu_0(self.batchnorm_0(x))
    v = x if self.has_shortcut else out
    out = self.conv_0(_pad(v, self._stride))
    out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
    return torch.add(self.shortcut(x) if self.has_shortcut else x, out)


class DMBlockGroup(nn.Module):
  def __init__(self, num_blocks, in_planes, out_planes, stride, activation_fn):
    super().__init__()
    self.block = nn.Sequential(*[DMBlock(in_planes if i == 0 else out_planes, out_planes,
                                         stride if i == 0 else 1, activation_fn)
                                 for i in range(num_blocks)])

  def forward(self, x):
    return self.block(x)


class _Normalised(nn.Module):
  """The DM models' mean/std, buffers outside the state_dict (persistent=False)."""

  def _set_statistics(self):
    self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(CIFAR10_STD).view(3, 1, 1), persistent=False)


class DMWideResNet(_Normalised):
  """dm_wide_resnet.py's DMWideResNet."""

  def __init__(self, num_classes=10, depth=28, width=10, activation="swish"):
    super().__init__()
    self._set_statistics()
    act = ACTIVATIONS[activation]
    channels = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    self.init_conv = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
    self.layer = nn.Sequential(DMBlockGroup(n, channels[0], channels[1], 1, act),
                               DMBlockGroup(n, channels[1], channels[2], 2, act),
                               DMBlockGroup(n, channels[2], channels[3], 2, act))
    self.batchnorm = nn.BatchNorm2d(channels[3])
    self.relu = act()
    self.logits = nn.Linear(channels[3], num_classes)
    self.num_channels = channels[3]

  def forward(self, x):
    out = self.layer(self.init_conv((x - self.mean) / self.std))
    out = self.relu(self.batchnorm(out))
    return self.logits(F.avg_pool2d(out, 8).view(-1, self.num_channels))


class DMPreActBlock(nn.Module):
  """dm_wide_resnet.py's _PreActBlock (a padded 3x3 conv shortcut of x)."""

  def __init__(self, in_planes, out_planes, stride, activation_fn):
    super().__init__()
    self._stride = stride
    self.batchnorm_0 = nn.BatchNorm2d(in_planes)
    self.relu_0 = activation_fn()
    self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(out_planes)
    self.relu_1 = activation_fn()
    self.conv_2d_2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.has_shortcut = stride != 1 or in_planes != out_planes
    if self.has_shortcut:
      self.shortcut = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)

  def forward(self, x):
    out = self.relu_0(self.batchnorm_0(x))
    shortcut = self.shortcut(_pad(x, self._stride)) if self.has_shortcut else x
    out = self.conv_2d_1(_pad(out, self._stride))
    return self.conv_2d_2(self.relu_1(self.batchnorm_1(out))) + shortcut


class DMPreActResNet(_Normalised):
  """dm_wide_resnet.py's DMPreActResNet (depth 18), first stage ``width`` channels."""

  def __init__(self, num_classes=10, width=64, activation="swish"):
    super().__init__()
    self._set_statistics()
    act = ACTIVATIONS[activation]
    self.conv_2d = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    cin = width
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
      setattr(self, f"layer_{i}", nn.Sequential(DMPreActBlock(cin, width * mult, stride, act),
                                                DMPreActBlock(width * mult, width * mult, 1,
                                                              act)))
      cin = width * mult
    self.batchnorm = nn.BatchNorm2d(cin)
    self.relu = act()
    self.logits = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = self.conv_2d((x - self.mean) / self.std)
    out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
    out = self.relu(self.batchnorm(out))
    return self.logits(F.avg_pool2d(out, 4).view(out.size(0), -1))


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
  """``net`` in eval() with random BatchNorm statistics and affine parameters (and its conv and
  linear weights as torch initialised them), so that a wrong mapping shows in the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
        m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
  return net.eval()

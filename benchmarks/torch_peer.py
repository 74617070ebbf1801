"""The PyTorch peer: SmallCNN, its GFA objective and APGD-CE / PGD, written the usual way.

    pip install -e '.[bench]'          # on our machines: pip install 'torch==2.13.0+cpu'
    python -m benchmarks.torch_peer    # torch train steps + GEMM probe, JSON lines

The train steps also run the ResNet-18 and WideResNets of tests/torch_archs.py (``--model``;
GFA's layer inputs through forward pre-hooks, ``InputTaps``), under bfloat16 autocast with
``--dtype bfloat16``, and on ``--torch-device`` (default: the GPU when PyTorch sees one).

This is what a PyTorch user would write (eager mode, NCHW, ``torch.autograd.grad(...,
create_graph=True)`` on the layer inputs for GFA, Adam), so that ``train_step.py --peer`` and
``attacks.py`` can time the JAX library against it in the same run. ``load_jax_params`` copies
JAX SmallCNN parameters in, which makes the two models compute the same function (the smoke
test checks the GFA objective agrees to float precision: the peer is the same computation).
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common


class SmallCNN(nn.Module):
  """3 x (Conv3x3 SAME, ReLU, 2x2 max-pool), Dense 256, ReLU, Dense; [0, 1] images in NCHW.

  ``forward`` returns the logits and the inputs of the five layers (``layer0`` is the
  normalised image), like gfa_jax.models.SmallCNN's taps.
  """

  def __init__(self, num_classes: int = 10, widths=(32, 64, 128), hidden: int = 256):
    super().__init__()
    channels = (3, *widths)
    self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, widths))
    self.fc1 = nn.Linear(widths[-1] * 4 * 4, hidden)
    self.fc2 = nn.Linear(hidden, num_classes)

  def forward(self, x: torch.Tensor, input_needs_grad: bool = False):
    h = (x - 0.5) / 0.5
    if input_needs_grad and not h.requires_grad:
      h.requires_grad_(True)  # GFA differentiates the task loss w.r.t. layer0 = this image.
    features = []
    for conv in self.convs:
      features.append(h)
      h = F.max_pool2d(F.relu(conv(h)), 2)
    h = h.flatten(1)
    features.append(h)
    h = F.relu(self.fc1(h))
    features.append(h)
    return self.fc2(h), features


def load_jax_params(model: SmallCNN, params) -> SmallCNN:
  """Copies gfa_jax SmallCNN ``params`` (HWIO kernels, NHWC flatten order) into ``model``."""
  as_np = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
  with torch.no_grad():
    for i, conv in enumerate(model.convs):
      conv.weight.copy_(as_np(params[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1))
      conv.bias.copy_(as_np(params[f"Conv_{i}"]["bias"]))
    # JAX flattens [B, 4, 4, C] (h, w, c); torch flattens [B, C, 4, 4] (c, h, w).
    kernel = as_np(params["Dense_0"]["kernel"])  # [4 * 4 * C, hidden]
    width = model.convs[-1].out_channels
    kernel = kernel.reshape(4, 4, width, -1).permute(2, 0, 1, 3).reshape(16 * width, -1)
    model.fc1.weight.copy_(kernel.T)
    model.fc1.bias.copy_(as_np(params["Dense_0"]["bias"]))
    model.fc2.weight.copy_(as_np(params["Dense_1"]["kernel"]).T)
    model.fc2.bias.copy_(as_np(params["Dense_1"]["bias"]))
  return model


# ---------------------------------------------------------------------------------------------
# Objectives: the paper's MSE task loss and GFA, alpha * task + beta * (1 - mean alignment).


def mse_softmax(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  return F.mse_loss(F.softmax(logits, dim=1), F.one_hot(y, logits.shape[1]).float())


def safe_norm(v: torch.Tensor) -> torch.Tensor:
  """Per-row L2 norm whose gradient is 0, not NaN, at a zero row."""
  squared = (v * v).sum(dim=1)
  positive = squared > 0
  return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  a, b = a.flatten(1).float(), b.flatten(1).float()  # float32 under bfloat16 autocast too
  return (a * b).sum(dim=1) / torch.clamp(safe_norm(a) * safe_norm(b), min=eps)


def gfa_loss(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, layers, alpha: float,
             beta: float, eps: float = 1e-12):
  """``(objective, task_loss, penalty)`` with the alignment of the inputs of ``layers``."""
  logits, features = model(x, input_needs_grad=0 in layers)
  task_loss = mse_softmax(logits.float(), y)
  taps = [features[i] for i in layers]
  grads = torch.autograd.grad(task_loss, taps, create_graph=True)
  alignment = torch.stack([per_sample_cosine(g, h, eps).mean() for g, h in zip(grads, taps)])
  penalty = 1.0 - alignment.mean()
  return alpha * task_loss + beta * penalty, task_loss, penalty


# ---------------------------------------------------------------------------------------------
# Attacks (linf, untargeted): PGD with the same keep-best rule as gfa_jax.attacks.pgd, and
# APGD-CE after AutoAttack's autopgd_base.attack_single_run. Both attack every image given.


def _ce_and_grad(model, x_adv, y):
  x_adv = x_adv.detach().requires_grad_(True)
  logits, _ = model(x_adv)
  loss = F.cross_entropy(logits, y, reduction="none")
  (grad,) = torch.autograd.grad(loss.sum(), x_adv)
  return loss.detach(), logits.detach(), grad


def _project(x_adv, x, eps):
  return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def _is_better(loss, fooled, best_loss, best_fooled):
  return (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))


def pgd(model, x, y, eps: float, steps: int, step_size: float | None = None):
  """PGD from a uniform start; per example the best iterate (fooling first, then loss)."""
  step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
  x_adv = _project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
  best_x = x_adv.clone()
  best_loss = torch.full((len(x),), -float("inf"), device=x.device)
  best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

  def keep_best(x_adv, loss, logits):
    nonlocal best_loss, best_fooled
    fooled = logits.argmax(1) != y
    better = _is_better(loss, fooled, best_loss, best_fooled)
    best_x[better] = x_adv[better]
    best_loss = torch.where(better, loss, best_loss)
    best_fooled = best_fooled | fooled

  for _ in range(steps):
    loss, logits, grad = _ce_and_grad(model, x_adv, y)
    with torch.no_grad():
      keep_best(x_adv, loss, logits)
      x_adv = _project(x_adv + step_size * grad.sign(), x, eps)
  with torch.no_grad():
    logits, _ = model(x_adv)
    keep_best(x_adv, F.cross_entropy(logits, y, reduction="none"), logits)
  return best_x


def apgd_ce(model, x, y, eps: float, steps: int = 100, rho: float = 0.75):
  """APGD-CE, one run of ``steps`` iterations (AutoAttack's defaults)."""
  n = len(x)
  window = max(int(0.22 * steps), 1)
  min_window, shrink = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
  t = 2 * torch.rand_like(x) - 1
  x_adv = torch.clamp(x + eps * t / t.abs().amax(dim=(1, 2, 3), keepdim=True), 0.0, 1.0)
  loss, logits, grad = _ce_and_grad(model, x_adv, y)
  x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
  x_out, out_loss, out_fooled = x_adv.clone(), loss.clone(), logits.argmax(1) != y
  loss_steps = torch.zeros(steps + 1, n, device=x.device)
  loss_steps[0] = loss
  step = torch.full((n, 1, 1, 1), 2.0 * eps, device=x.device)
  x_old = x_adv.clone()
  loss_best_last_check = loss_best.clone()
  reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
  since_check = 0
  for i in range(steps):
    with torch.no_grad():
      momentum = 0.75 if i > 0 else 1.0
      z = _project(x_adv + step * grad.sign(), x, eps)
      x_new = _project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_old), x, eps)
      x_old = x_adv
    loss, logits, grad = _ce_and_grad(model, x_new, y)
    with torch.no_grad():
      x_adv = x_new
      loss_steps[i + 1] = loss
      fooled = logits.argmax(1) != y
      better = _is_better(loss, fooled, out_loss, out_fooled)
      x_out[better] = x_adv[better]
      out_loss = torch.where(better, loss, out_loss)
      out_fooled = out_fooled | fooled
      improved = loss > loss_best
      x_best[improved], grad_best[improved] = x_adv[improved], grad[improved]
      loss_best = torch.where(improved, loss, loss_best)
      since_check += 1
      if since_check == window:
        increases = (loss_steps[i + 2 - window:i + 2] > loss_steps[i + 1 - window:i + 1]).sum(0)
        halve = (increases <= window * rho) | (~reduced_last_check
                                               & (loss_best_last_check >= loss_best))
        reduced_last_check, loss_best_last_check = halve, loss_best.clone()
        step[halve] /= 2.0
        x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
        window, since_check = max(window - shrink, min_window), 0
  return x_out


# ---------------------------------------------------------------------------------------------
# Benchmark cases.

TRAIN_CASE_NAMES = common.TORCH_TRAIN_CASES


class InputTaps:
  """GFA's layer inputs of a torch model that does not return them: forward pre-hooks record
  the input of each of ``modules`` (``layer0`` first), as ``penalty.tap_module_inputs`` does
  for Flax. ``forward`` returns ``(logits, features)`` like ``SmallCNN``."""

  def __init__(self, model: nn.Module, modules):
    self.model, self.inputs = model, {}
    for i, module in enumerate(modules):
      module.register_forward_pre_hook(functools.partial(self._record, i))

  def _record(self, i, module, args):
    self.inputs[i] = args[0]

  def __call__(self, x: torch.Tensor, input_needs_grad: bool = False):
    if input_needs_grad and not x.requires_grad:
      x = x.detach().requires_grad_(True)  # layer0 is the image the stem sees.
    self.inputs.clear()
    logits = self.model(x)
    return logits, [self.inputs[i] for i in sorted(self.inputs)]

  def parameters(self):
    return self.model.parameters()


def peer_model(name: str):
  """The torch twin of train_step.build_model's ``name``, returning ``(logits, features)``:
  SmallCNN, or tests/torch_archs.py's ResNet-18 / WideResNet (the published code's layout) in
  eval mode (BatchNorm on fixed running statistics, as the JAX side's ``FixedStats``) with the
  inputs of the stem and of the first two residual blocks as layer0..2."""
  if name == "small_cnn":
    return SmallCNN()
  from tests import torch_archs  # the twins of the architectures gfa_jax imports

  if name == "resnet18":
    net = torch_archs.ResNet18().eval()
    return InputTaps(net, [net.conv1, net.layer1[0], net.layer1[1]])
  size = common.wrn_size(name)
  if size is None:
    raise ValueError(f"the PyTorch peer has no model {name!r}; choose one of "
                     f"{list(common.PEER_MODELS)} or wrn<depth>_<width>")
  net = torch_archs.WideResNet(*size).eval()
  blocks = [*net.block1.layer, *net.block2.layer, *net.block3.layer]  # gfa_jax's layer1, 2...
  return InputTaps(net, [net.conv1, *blocks[:2]])


def build_train_case(layers, args: argparse.Namespace) -> common.Case:
  """One Adam step on a fixed batch on ``--torch-device``: standard (layers None) or GFA, in
  float32 or under bfloat16 autocast (``--dtype``)."""
  from configs import default

  torch.set_num_threads(args.threads)
  device = common.torch_device(args)
  sync = common.torch_synchronizer(device)
  torch.backends.cudnn.benchmark = True  # what a user timing a fixed shape on a GPU sets
  config = default.get_config()
  torch.manual_seed(0)
  model = peer_model(getattr(args, "model", "small_cnn"))
  (model.model if isinstance(model, InputTaps) else model).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  x = torch.rand(args.batch, 3, 32, 32, device=device)
  y = torch.randint(0, 10, (args.batch,), device=device)
  dtype = getattr(args, "dtype", "float32")
  autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                               enabled=dtype == "bfloat16")

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      if layers is None:
        loss = mse_softmax(model(x)[0].float(), y)
      else:
        loss = gfa_loss(model, x, y, layers, config.alpha, config.beta, config.gfa_eps)[0]
    loss.backward()
    optimizer.step()
    sync()

  kind = "standard" if layers is None else "gfa"
  small = getattr(args, "model", "small_cnn") == "small_cnn"
  flops = common.FLOPS_PER_IMAGE[kind] * args.batch if small else None  # SmallCNN's count only
  return common.Case(step, args.batch, flops,
                     {"framework": "torch", "model": getattr(args, "model", "small_cnn"),
                      "dtype": dtype, "device": device_name(device)},
                     functools.partial(device_memory, device))


def device_name(device) -> str:
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_memory(device) -> dict:
  """PyTorch's peak GPU memory since the worker started (set-up included); {} on the CPU."""
  if device.type != "cuda":
    return {}
  return {"device_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def build_gemm(args: argparse.Namespace) -> common.Case:
  """PyTorch's float32 matmul rate on an n x n x n product on ``--torch-device`` (on a CPU,
  MKL's: this CPU's GEMM rate)."""
  torch.set_num_threads(args.threads)
  device = common.torch_device(args)
  sync = common.torch_synchronizer(device)
  n = args.gemm_size
  a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

  def step():
    torch.mm(a, b)
    sync()

  return common.Case(step, 0, 2.0 * n**3, {"framework": "torch", "device": device_name(device)})


def build_attack_case(name: str, args: argparse.Namespace) -> common.Case:
  """One step attacks all ``args.num_images`` test images, ``args.batch`` at a time."""
  from benchmarks import attacks

  torch.set_num_threads(args.threads)
  device = common.torch_device(args)
  params, images, labels, description = attacks.model_and_images(args)
  model = load_jax_params(SmallCNN(), params).eval().to(device)
  for p in model.parameters():
    p.requires_grad_(False)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(labels).long().to(device)
  attack = {"torch_apgd_ce": functools.partial(apgd_ce, model, eps=args.eps, steps=args.apgd_steps),
            "torch_pgd": functools.partial(pgd, model, eps=args.eps, steps=args.pgd_steps)}[name]
  attack(x[:args.batch], y[:args.batch], steps=1)  # Warm-up: oneDNN sets up per shape.
  last = {}

  def step():  # .cpu() waits for the batch's kernels, so the step ends when they have run
    last["x_adv"] = attacks.run_in_batches(lambda a, b: attack(a, b).cpu(), x, y, args.batch)

  def accuracy(images):
    with torch.no_grad():
      logits = model(torch.as_tensor(images, device=device))[0]
      return round((logits.argmax(1) == y).float().mean().item(), 4)

  flops = attacks.attack_flops_per_image(name.removeprefix("torch_"), args) * len(x)
  return common.Case(step, len(x), flops, {"framework": "torch", "images": description,
                                           "device": device_name(device)},
                     lambda: {"robust_accuracy": accuracy(last["x_adv"]),
                              "clean_accuracy": accuracy(x)})


CASES = {
    "torch_standard": lambda args: build_train_case(None, args),
    "torch_gfa_first": lambda args: build_train_case((0,), args),
    "torch_gfa_deep": lambda args: build_train_case((0, 1, 2), args),
    "torch_gemm": build_gemm,
    "torch_apgd_ce": lambda args: build_attack_case("torch_apgd_ce", args),
    "torch_pgd": lambda args: build_attack_case("torch_pgd", args),
}


def main(argv: list[str]) -> None:
  p = common.parser(__doc__.splitlines()[0], steps=20, warmup=3, rounds=5)
  args = common.add_train_step_flags(p).parse_args(argv)
  if not args.worker:  # Run alone it times the train steps and the GEMM probe.
    args.cases = args.cases or ",".join(TRAIN_CASE_NAMES)
  common.main("benchmarks.torch_peer", CASES, args)


if __name__ == "__main__":
  main(sys.argv[1:])

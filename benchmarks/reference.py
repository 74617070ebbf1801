"""The two sides of a comparison with the reference AutoAttack, on one model and images.

Shared by scripts/crosscheck_reference.py (per-example agreement, docs/validation.md) and
benchmarks/attacks.py (AutoAttack's wall time against the reference's): the reference is the
authors' code (`pyautoattack`, the [crosscheck] extra), run natively in PyTorch; gfa-jax runs
its registry's attack. Only these scripts import torch or pyautoattack, never the library.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np

# Our registry name and the reference's attacks_to_run name of each compared attack.
ATTACKS = {"apgd-ce": "apgd", "apgd-t": "apgd-t", "fab-t": "fab", "square": "square",
           "autoattack": "autoattack"}
# Ours runs as the reference's stage does: FAB-T as the one attack of a custom AutoAttack, i.e.
# eps-bounded, one target at a time on the points still robust. Our registry's `fab` is the
# minimum-norm attack over every target, thresholded at eps afterwards: a different (stronger,
# slower) search that is not what attacks_to_run=['fab'] computes.
OURS = {"fab-t": ("autoattack", {"version": "custom", "attacks": ("fab-t",)})}
REF_NORM = {"linf": "Linf", "l2": "L2"}


def reference_model(model: str):
  """(torch module in eval mode mapping NCHW [0, 1] images to logits, description)."""
  import torch

  if model == "resnet18":
    import pyautoattack  # noqa: F401  (a clear ImportError without the [crosscheck] extra)
    from pyautoattack.examples.resnet import ResNet18
    net = ResNet18()
    net.load_state_dict(torch.load(resnet18_path(), map_location="cpu", weights_only=True))
    return net.eval(), "reference ResNet-18 (pyautoattack/examples/model_test.pt)"
  from benchmarks import torch_peer
  from gfa_jax import checkpoints

  _, variables = checkpoints.load_model(model)

  class Logits(torch.nn.Module):  # the peer returns (logits, features)
    def __init__(self):
      super().__init__()
      self.net = torch_peer.load_jax_params(torch_peer.SmallCNN(), variables["params"])

    def forward(self, x):
      return self.net(x)[0]

  return Logits().eval(), f"torch SmallCNN with the weights of {model}"


def resnet18_path() -> Path:
  import pyautoattack
  return Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"


def ours_model(model: str):
  """gfa-jax's (apply_fn, variables) of the same model."""
  import gfa_jax
  if model == "resnet18":
    return gfa_jax.load_torch_model(resnet18_path(), "resnet18")
  return gfa_jax.load_model(model)


def robust_mask(predict, x_adv, x, y, clean_correct, eps, norm):
  """Robust iff correct clean and at x_adv, after checking x_adv's budget and range."""
  from gfa_jax.attacks import core
  core.check_adversarial(x_adv, x, eps, norm)
  return clean_correct & (predict(x_adv) == y)


def run_ours(name, apply_fn, variables, x, y, eps, norm, seed, batch_size) -> dict:
  """Our attack `name`: {'mask': robust mask [N], 'seconds', and for AutoAttack 'checks',
  'stage_seconds', 'compile_seconds' (the compiling part of each stage's) and 'robust_after'
  (robust accuracy after each stage), else None}."""
  from gfa_jax import batching, evaluate
  logits_fn = batching.bind(apply_fn, variables)
  start = time.perf_counter()
  clean = batching.predict(logits_fn, x, batch_size) == y
  attack, overrides = OURS.get(name, (ATTACKS[name], None))
  result = evaluate.run_attack(attack, logits_fn, x, y, eps=[eps], norm=norm,
                               clean_correct=clean, batch_size=batch_size, seed=seed,
                               overrides=overrides, progress=False)
  seconds = time.perf_counter() - start
  first = lambda key: result.get(key, [None])[0]  # results hold one entry per eps
  return {"mask": np.asarray(first("still_robust")), "seconds": seconds, "checks": first("checks"),
          "stage_seconds": first("stage_seconds"), "compile_seconds": first("stage_compile_seconds"),
          "robust_after": first("robust_accuracy_after")}


def run_reference(name, net, x, y, eps, norm, seed, batch_size, device="cpu") -> dict:
  """The reference attack, in run_ours's record: its check warnings, and seconds and robust
  accuracy of each stage from its log lines. ``net`` must already be on ``device`` (e.g.
  'cuda'), where the reference moves each batch."""
  import torch
  from pyautoattack import AutoAttack

  warnings, totals, robust_after = [], {}, {}

  class Capture(logging.Handler):
    def emit(self, record):
      message = record.getMessage()
      if record.levelno >= logging.WARNING:
        warnings.append(message)
      # "initial accuracy: 94.50%", "robust accuracy after APGD-CE: 23.00% (total time 61.2
      # s)": robust accuracy and cumulative time of each stage.
      clean = re.match(r"initial accuracy: ([\d.]+)%", message)
      if clean:
        robust_after["clean"] = float(clean[1]) / 100
      stage = re.match(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)",
                       message)
      if stage:
        robust_after[stage[1].lower()] = float(stage[2]) / 100
        totals[stage[1].lower()] = float(stage[3])

  logger = logging.getLogger("auto-attack")
  handler = Capture()
  logger.addHandler(handler)
  level, propagate = logger.level, logger.propagate
  logger.setLevel(logging.DEBUG)  # the stage times are DEBUG lines: captured, not printed
  logger.propagate = False
  try:
    aa = AutoAttack(net, norm=REF_NORM[norm], eps=eps, version="standard", seed=seed,
                    device=device)
    if name != "autoattack":
      aa.attacks_to_run = [name]
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    start = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(xt, yt, batch_size=batch_size)
    seconds = time.perf_counter() - start
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
  # Cumulative "total time" per stage -> seconds of each stage (the clean pass and the checks
  # before the first stage are in the run's total only).
  stage_seconds, previous = {}, 0.0
  for stage, total in totals.items():
    stage_seconds[stage], previous = total - previous, total

  def predict(images):
    with torch.no_grad():
      return np.concatenate([net(torch.from_numpy(images[i:i + batch_size].transpose(0, 3, 1, 2)
                                                  .copy()).to(device)).argmax(1).cpu().numpy()
                             for i in range(0, len(images), batch_size)])

  x_adv = x_adv.detach().cpu().numpy().transpose(0, 2, 3, 1)
  clean = predict(x) == y
  return {"mask": robust_mask(predict, x_adv, x, y, clean, eps, norm), "seconds": seconds,
          "checks": warnings, "stage_seconds": stage_seconds, "robust_after": robust_after}

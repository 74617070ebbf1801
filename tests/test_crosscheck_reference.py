"""The reference AutoAttack (pyautoattack, fra31/auto-attack) as the oracle of our attacks.

Same model (the committed PGD-AT SmallCNN, copied into the torch SmallCNN of
benchmarks/torch_peer.py), same 64 embedded test images, same hyper-parameters at a small
budget: robust accuracy must agree within 4 points (1,000-image full-budget runs agree far
closer: docs/validation.md) and per-example robust masks on at least 90 % of the images. A
broken attack (one that returns x, or attacks the wrong class) misses by tens of points.
The reference's automatic checks must fire where ours do.
"""

import functools
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (pip install -e '.[crosscheck]')")
pyautoattack = pytest.importorskip("pyautoattack", reason="needs the [crosscheck] extra")
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

from benchmarks import torch_peer  # noqa: E402
from gfa_jax import batching, checkpoints, data, evaluate  # noqa: E402
from gfa_jax.attacks import autoattack, core  # noqa: E402

# The slow set (make test-slow; CI runs it too): cross-checks against the reference AutoAttack.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255
N = 64


class _Logits(torch.nn.Module):
  def __init__(self, params):
    super().__init__()
    self.net = torch_peer.load_jax_params(torch_peer.SmallCNN(), params)

  def forward(self, x):
    return self.net(x)[0]


@pytest.fixture(scope="module")
def setup():
  torch.set_num_threads(1)
  apply_fn, variables = checkpoints.load_model(ROOT / "results" / "pgd_at" / "params.msgpack")
  dataset = data.load_dataset("embedded", None)
  x = data.to_float(dataset.test_images[:N])
  y = dataset.test_labels[:N].astype(np.int32)
  return functools.partial(apply_fn, variables), _Logits(variables["params"]).eval(), x, y


# name in our registry, our overrides, the reference attack built for a seed.
CASES = {
    "apgd-ce": ("apgd", {"steps": 20},
                lambda net, s: APGDAttack(net, n_iter=20, eps=EPS, norm="Linf", seed=s,
                                          device="cpu")),
    "apgd-t": ("apgd-t", {"steps": 10, "num_targets": 3},
               lambda net, s: APGDAttack_targeted(net, n_iter=10, eps=EPS, norm="Linf", seed=s,
                                                  device="cpu", n_target_classes=3)),
    "fab-t": ("fab", {"steps": 10, "num_targets": 3},
              lambda net, s: FABAttack_PT(net, n_iter=10, eps=EPS, norm="Linf", seed=s,
                                          device="cpu", targeted=True, n_target_classes=3)),
    "square": ("square", {"n_queries": 200},
               lambda net, s: SquareAttack(net, n_queries=200, eps=EPS, norm="Linf", seed=s,
                                           device="cpu", p_init=0.8, resc_schedule=False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_robust_masks_agree_with_the_reference(setup, name):
  logits_fn, net, x, y = setup
  ours_name, overrides, make_reference = CASES[name]
  clean = batching.predict(logits_fn, x, N) == y
  ours = np.asarray(evaluate.run_attack(
      ours_name, logits_fn, x, y, eps=[EPS], norm="linf", clean_correct=clean, batch_size=N,
      seed=0, overrides=overrides, progress=False)["still_robust"][0])
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y.astype(np.int64))
  x_ref = make_reference(net, 0).perturb(xt, yt).detach()
  core.check_adversarial(x_ref.numpy().transpose(0, 2, 3, 1), x, EPS, "linf")
  with torch.no_grad():
    ref = clean & (net(x_ref).argmax(1).numpy() == y)
  assert abs(ours.mean() - ref.mean()) <= 4 / N + 1e-9, (name, ours.mean(), ref.mean())
  assert (ours == ref).mean() >= 0.9, (name, (ours == ref).mean())
  assert 0 < ref.sum() < clean.sum()  # the attack did something and was not trivially total


def _reference_warnings(check, *args):
  messages = []

  class Capture(logging.Handler):
    def emit(self, record):
      messages.append(record.getMessage())

  logger = logging.getLogger("crosscheck-test")
  logger.addHandler(Capture())
  check(*args, logger=logger)
  return messages


def test_checks_fire_where_the_reference_does(setup):
  from pyautoattack import checks
  logits_fn, net, x, y = setup
  probabilities = lambda images: __import__("jax").nn.softmax(logits_fn(images))
  ours = autoattack.check_range_output(np.asarray(probabilities(x)))
  ref = _reference_warnings(checks.check_range_output,
                            lambda t: torch.softmax(net(t), 1), torch.from_numpy(
                                x.transpose(0, 3, 1, 2).copy()))
  assert ours["status"] == "warn" and len(ref) == 1
  assert autoattack.check_range_output(np.asarray(logits_fn(x)))["status"] == "ok"
  after = {"clean": 0.5, "apgd-ce": 0.3, "apgd-t": 0.3, "fab-t": 0.3, "square": 0.25}
  assert autoattack.check_square_sr(after)["status"] == "warn"
  assert len(_reference_warnings(checks.check_square_sr, after)) == 1
  after["square"] = 0.299
  assert autoattack.check_square_sr(after)["status"] == "ok"
  assert not _reference_warnings(checks.check_square_sr, after)
  # A model whose output ignores the input: every gradient is 0, both sides warn.
  constant = lambda images: 0.0 * logits_fn(images) + 1.0
  assert autoattack.check_zero_gradients(constant, x[:8], y[:8])["zero_gradient_points"] == 8
  assert len(_reference_warnings(checks.check_zero_gradients, torch.zeros(8, 3, 32, 32))) == 1
  assert autoattack.check_n_classes(3, ["apgd-t"], {"apgd-t": (("num_targets", 9),)})["status"] == "warn"
  assert len(_reference_warnings(checks.check_n_classes, 3, ["apgd-t"], 9, 9)) == 1


def test_tables_merge_the_runs_of_parallel_queues(tmp_path):
  import importlib.util
  import json
  spec = importlib.util.spec_from_file_location("crosscheck_reference",
                                                ROOT / "scripts" / "crosscheck_reference.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  head = {"model": "m", "norm": "linf", "eps": 0.1, "num_examples": 2}
  run = lambda attack, impl: {"attack": attack, "impl": impl, "seed": 0, "seconds": 1.0,
                              "robust_accuracy": 0.5, "still_robust": [1, 0]}
  (tmp_path / "a.json").write_text(json.dumps({**head, "runs": [run("square", "gfa-jax"),
                                                                run("square", "reference")]}))
  (tmp_path / "queue2").mkdir()
  (tmp_path / "queue2" / "a.json").write_text(json.dumps({**head, "runs": [run("fab-t", "gfa-jax"),
                                                                         run("fab-t", "reference")]}))
  (record,) = script.merged_records(tmp_path)
  assert [r["attack"] for r in record["runs"]] == ["square", "square", "fab-t", "fab-t"]
  assert {row["attack"] for row in script.compare(record)} == {"square", "fab-t"}
  # AutoAttack's stages: the reference logs none once no point is left ("-").
  aa = lambda impl, after: {**run("autoattack", impl), "robust_after": after,
                            "stage_seconds": {k: 2.0 for k in after}}
  record["runs"] += [aa("gfa-jax", {"apgd-ce": 0.0, "apgd-t": 0.0}), aa("reference", {"apgd-ce": 0.0})]
  row = script.stage_table([{**record, "eps_text": "0.1"}]).splitlines()[-1]
  assert row.startswith("| m | linf 0.1 | 2 | 0 | 0.0 / 0.0; 2 / 2 | 0.0 / -; 2 / - |"), row


def test_runners_record_each_stage_of_both_sides():
  from benchmarks import reference
  model = ROOT / "results" / "pgd_at" / "params.msgpack"
  apply_fn, variables = reference.ours_model(model)
  net, _ = reference.reference_model(model)
  dataset = data.load_dataset("embedded", None)
  x, y = data.to_float(dataset.test_images[:8]), dataset.test_labels[:8].astype(np.int32)
  # eps 0.5: APGD-CE breaks every point, so the later stages do not run on either side.
  ours = reference.run_ours("autoattack", apply_fn, variables, x, y, 0.5, "linf", 0, 8)
  ref = reference.run_reference("autoattack", net, x, y, 0.5, "linf", 0, 8)
  for run in (ours, ref):
    assert run["mask"].shape == (8,) and not run["mask"].any()
    assert run["robust_after"]["apgd-ce"] == 0.0 and "apgd-ce" in run["stage_seconds"]
  assert abs(ours["robust_after"]["clean"] - ref["robust_after"]["clean"]) < 1e-6

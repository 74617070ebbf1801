"""One-step smoke runs of every benchmark script (so they cannot rot), and the PyTorch peer's
equivalence to the JAX model and GFA objective. Nothing here asserts on timing."""

import json
import os
import subprocess
import sys

import numpy as np
import chex
import pytest

from benchmarks import common
from tests.conftest import REPO

# The slow set (make test-slow; CI runs it too): benchmark scripts run end to end.
pytestmark = pytest.mark.slow

TINY = ["--steps", "1", "--warmup", "0", "--rounds", "1"]


def run_benchmark_lines(module: str, *flags: str) -> list[dict]:
  """Runs ``python -m benchmarks.<module>`` and returns its JSON lines."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *TINY, *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def run_benchmark(module: str, *flags: str) -> dict[str, dict]:
  """Runs ``python -m benchmarks.<module>`` and returns its JSON lines by name."""
  return {r["name"]: r for r in run_benchmark_lines(module, *flags)}


def assert_timed(record: dict, images: bool = True) -> None:
  assert record["ms_per_step"] > 0 and record["peak_rss_mb"] > 0, record
  if images:
    assert record["images_per_s"] > 0, record


def test_train_step_runs_and_its_flop_count_agrees_with_xla():
  records = run_benchmark("train_step", "--batch", "8", "--gemm-size", "64",
                          "--cases", "standard,gfa_deep,gemm")
  for name in ("standard", "gfa_deep"):
    assert_timed(records[name])
    # XLA counts only the taps of SAME convolutions inside the image (about 8% fewer).
    assert 0.8 < records[name]["xla_gflop_per_step"] / records[name]["gflop_per_step"] < 1.0
  assert_timed(records["gemm"], images=False)


def test_scaling_runs_each_batch():
  # SmallCNN only: the ResNets' GFA-DEEP steps take minutes to compile on CI's two cores
  # (their models are built by the test below).
  lines = run_benchmark_lines("scaling", "--models", "small_cnn", "--batches", "4,2")
  points = [r for r in lines if r["name"] == "point"]
  assert [(p["model"], p["batch"]) for p in points] == [("small_cnn", 4), ("small_cnn", 2)]
  for p in points:
    assert p["standard_ms_per_image"] > 0 and p["gfa_deep_ms_per_image"] > 0, p
    assert p["gfa_deep_over_standard"] == pytest.approx(
        p["gfa_deep_ms_per_image"] / p["standard_ms_per_image"], rel=1e-2)
  # GFA-DEEP's step holds a second backward pass: XLA counts more FLOPs than the standard's.
  steps = {(r["batch"], r["name"]): r for r in lines if r["name"] in ("standard", "gfa_deep")}
  assert steps[(4, "gfa_deep")]["xla_gflop_per_step"] > 1.5 * steps[(4, "standard")][
      "xla_gflop_per_step"]


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_scaling_models_build_and_run_as_train_lib_calls_them(name):
  import jax
  import numpy as np

  from benchmarks import train_step
  from configs import default

  model, params = train_step.build_model(name, default.get_config(), jax.random.key(0))
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  logits = model.apply({"params": params}, x)  # train_lib's call: params only
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)


def test_epoch_runs_loop_and_pipeline():
  records = run_benchmark("epoch", "--batch", "8", "--block", "2",
                          "--cases", "pipeline,epoch_gfa_deep_no_sync")
  assert_timed(records["pipeline"])
  assert_timed(records["epoch_gfa_deep_no_sync"])
  assert records["summary"]["epoch_gfa_deep_no_sync_s_per_cifar10_epoch"] > 0


def test_attacks_run_and_report_robust_accuracy():
  records = run_benchmark("attacks", "--num-images", "4", "--batch", "4", "--apgd-steps", "2",
                          "--square-queries", "3", "--cases", "apgd_ce,square")
  for name in ("apgd_ce", "square"):
    assert_timed(records[name])
    assert 0 <= records[name]["robust_accuracy"] <= records[name]["clean_accuracy"]


def test_autoattack_against_the_reference_runs_and_reports_each_stage():
  pytest.importorskip("pyautoattack", reason="needs the [crosscheck] extra")
  # eps 0.5: APGD-CE breaks every point, so the later stages (and their compiles) are skipped.
  records = run_benchmark("attacks", "--num-images", "6", "--batch", "6", "--cases",
                          "autoattack,reference_autoattack", "--checkpoint",
                          "results/pgd_at/params.msgpack", "--eps", "0.5")
  for name in ("autoattack", "reference_autoattack"):
    assert_timed(records[name])
    assert records[name]["robust_accuracy"] == 0.0
    assert "apgd-ce" in records[name]["stage_seconds"]
  assert records["summary"]["autoattack_jax_over_reference_seconds"] > 0


def test_forward_cases_and_the_ynnpack_variant_run_side_by_side():
  pytest.importorskip("torch")
  records = run_benchmark("attacks", "--num-images", "4", "--batch", "4", "--cases",
                          "forward,forward@ynnpack,torch_forward", "--checkpoint",
                          "results/pgd_at/params.msgpack")
  for name in ("forward", "forward@ynnpack", "torch_forward"):
    assert_timed(records[name])
  # The variant's worker runs without the flag train.py sets, the plain case with it.
  assert "xla_cpu_experimental_ynn_fusion_type" in records["forward"]["xla_flags"]
  assert "xla_cpu_experimental_ynn_fusion_type" not in records["forward@ynnpack"]["xla_flags"]
  summary = records["summary"]
  assert summary["forward@ynnpack_over_forward"] > 0
  assert summary["forward_jax_over_torch_seconds"] > 0


def test_an_unknown_case_variant_is_refused_in_one_line():
  with pytest.raises(ValueError, match="@variant"):
    common.select_cases(["forward"], "forward@mkl")


def test_torch_peer_runs():
  pytest.importorskip("torch")
  records = run_benchmark("torch_peer", "--batch", "8", "--gemm-size", "64")
  for name in ("torch_standard", "torch_gfa_first", "torch_gfa_deep"):
    assert_timed(records[name])
  assert_timed(records["torch_gemm"], images=False)


def test_torch_peer_computes_the_same_gfa_objective_and_gradient():
  torch = pytest.importorskip("torch")
  import jax

  from benchmarks import torch_peer
  from configs import default
  from gfa_jax import models, objectives

  config = default.get_config()  # GFA-DEEP, MSE on softmax, alpha 1, beta 0.1.
  config.beta = 1.0  # Weigh the penalty fully, so a wrong second-order term shows.
  model = models.SmallCNN()
  params = models.init_params(model, jax.random.key(0), (32, 32, 3))
  x = np.array(jax.random.uniform(jax.random.key(1), (4, 32, 32, 3)))  # A writable copy.
  y = np.array([0, 3, 3, 9], np.int32)
  objective = objectives.make_objective(config, model)
  (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(
      params, {"image": x, "label": y}, jax.random.key(2))

  peer = torch_peer.load_jax_params(torch_peer.SmallCNN(), jax.device_get(params))
  torch_loss, _, _ = torch_peer.gfa_loss(
      peer, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).long(), (0, 1, 2),
      config.alpha, config.beta, config.gfa_eps)
  torch_loss.backward()
  np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)
  # The first conv's kernel gradient, in JAX's HWIO layout, holds the double-backprop term.
  np.testing.assert_allclose(peer.convs[0].weight.grad.permute(2, 3, 1, 0).numpy(),
                             grads["Conv_0"]["kernel"], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(peer.fc2.weight.grad.T.numpy(), grads["Dense_1"]["kernel"],
                             rtol=1e-3, atol=1e-7)


def test_conv_lever_script_computes_the_same_convolutions_both_ways():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "scripts/conv_shifted_matmul.py", "--batch", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["layer"] for r in records] == ["conv1", "conv2", "conv3"]
  for r in records:
    assert r["max_err_fwd"] < 1e-4 and r["rel_err_kgrad"] < 1e-5, r
    assert r["fwd_lax"] > 0 and r["kgrad_shift"] > 0 and r["temp_mb_fwd_shift"] >= 0, r

"""The training loop keeps the device busy: metrics are read back only at logging, evaluation
and saving steps, the next batch is put while a step runs, and the results are those of the
loop that read everything back after every step. Also bfloat16 compute as an opt-in."""

import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gfa_jax import (batching, checkpoints, data, models, objectives, train_lib,
                     validation)
from gfa_jax.penalty import gfa_objective
from tests.conftest import REPO

# Recorded from the loop before issue 34 (it read the metrics back after every step): configs/
# tiny.py for 16 steps, logged every 3. (step, loss, grad_norm) of each train record, and the
# sum of the final parameters.
RECORDED_LOGS = [(3, 0.18005071580410004, 0.08505505323410034),
                 (6, 0.18124878406524658, 0.1311001181602478),
                 (9, 0.17889495193958282, 0.09544781595468521),
                 (12, 0.17577220499515533, 0.07578641921281815),
                 (15, 0.1726059764623642, 0.06970318406820297),
                 (16, 0.17394249141216278, 0.08746006339788437)]
RECORDED_PARAM_SUM = 59.170118674327085


def read_metrics(workdir, kind):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def param_sum(workdir):
  _, variables = checkpoints.load_model(workdir)
  return sum(np.sum(np.asarray(p), dtype=np.float64) for p in jax.tree.leaves(variables["params"]))


class CountingStep:
  """``make_train_step`` whose step counts its calls (``calls``), optionally making the
  metrics and parameters of call ``poison_at`` NaN."""

  def __init__(self, monkeypatch, poison_at: int | None = None):
    self.calls, self.poison_at = 0, poison_at
    make = train_lib.make_train_step
    monkeypatch.setattr(train_lib, "make_train_step",
                        lambda *a, **k: self.wrap(make(*a, **k)))

  def wrap(self, step):
    def counted(state, *args):
      state, metrics = step(state, *args)
      self.calls += 1
      if self.calls == self.poison_at:  # Later steps then go on from NaN parameters.
        metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
      return state, metrics
    return counted


def test_metrics_are_read_only_at_logging_steps_and_results_are_unchanged(
    tiny_config, tmp_path, monkeypatch):
  tiny_config.log_every_steps, tiny_config.eval_every_steps = 3, 0
  tiny_config.checkpoint_every_steps = 8
  step = CountingStep(monkeypatch)
  read_after = []  # How many steps had run at each read back to the host.
  fetch = batching.fetch

  def counted_fetch(tree):
    read_after.append(step.calls)
    return fetch(tree)

  monkeypatch.setattr(batching, "fetch", counted_fetch)
  train_lib.train_and_evaluate(tiny_config, tmp_path)
  assert step.calls == 16
  assert set(read_after) <= {0, 3, 6, 8, 9, 12, 15, 16}, read_after  # Logs, saves; 0: before.
  logs = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path, "train")]
  assert [s for s, *_ in logs] == [s for s, *_ in RECORDED_LOGS]
  np.testing.assert_allclose([v for _, *v in logs], [v for _, *v in RECORDED_LOGS], rtol=1e-6)
  np.testing.assert_allclose(param_sum(tmp_path), RECORDED_PARAM_SUM, rtol=1e-6)


def test_a_non_finite_step_between_reads_is_named_and_never_saved(
    tiny_config, tmp_path, monkeypatch):
  tiny_config.log_every_steps, tiny_config.eval_every_steps = 8, 0
  tiny_config.checkpoint_every_steps = 4
  CountingStep(monkeypatch, poison_at=6)
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step 6 .* last good "
                     r"checkpoint is step 4"):
    train_lib.train_and_evaluate(tiny_config, tmp_path)
  assert checkpoints.latest_step(tmp_path) == 4
  chex.assert_tree_all_finite(checkpoints.load_model(tmp_path)[1]["params"])
  metrics = tmp_path / "metrics.jsonl"  # Step 8's NaN record was never written.
  assert not metrics.exists() or read_metrics(tmp_path, "train") == []


@pytest.mark.slow
def test_loop_overhead_benchmark_runs_at_tiny_size(tmp_path):
  # Run from elsewhere, as it is pointed at other checkouts: it must find --repo's gfa_jax.
  result = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "loop_overhead.py"), "--configs", "tiny",
       "--steps", "4", "--log-every", "2", "--rounds", "1", "--repo", str(REPO)],
      cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  machine, tiny = map(json.loads, result.stdout.splitlines())
  assert machine["gfa_jax"] == str(REPO / "gfa_jax")
  assert tiny["name"] == "tiny" and tiny["step_ms"] > 0 and tiny["loop_ms"] > 0, tiny
  assert tiny["loop_overhead"] == pytest.approx(tiny["loop_ms"] / tiny["step_ms"] - 1, abs=1e-3)


def test_bfloat16_compute_trains_close_to_float32(tiny_config):
  # SmallCNN, narrow: the explicit-VJP convolutions (conv_same) and the matmuls in bfloat16.
  tiny_config.model.name, tiny_config.model.features = "small_cnn", (4, 8, 8)
  del tiny_config.model["hidden"]  # The MLP's tuple; SmallCNN's is one int.
  tiny_config.model.hidden, tiny_config.batch_size = 16, 8
  dataset = data.load_dataset("embedded")
  mesh = train_lib.make_mesh()
  runs = {}
  for dtype in ("float32", "bfloat16"):
    tiny_config.compute_dtype = dtype
    validation.validate_config(tiny_config)
    model = train_lib.training_model(tiny_config)
    state = train_lib.create_train_state(tiny_config, model, dataset.train_images.shape[1:],
                                         jax.random.key(0), 4)
    # Placed as the step returns it: an uncommitted state would compile the step twice.
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    step = train_lib.make_train_step(tiny_config, model, mesh, 4)
    runs[dtype] = []
    for i in range(3):
      rows = data.train_batch_indices(64, 8, 0, i)
      state, metrics = step(state, dataset.train_images[rows], dataset.train_labels[rows],
                            jax.random.key(1))
      runs[dtype].append(batching.fetch(metrics))
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
  assert train_lib.training_model(tiny_config).dtype == "bfloat16"
  values = lambda dtype, prefix: np.array(
      [[v for k, v in sorted(m.items()) if k.startswith(prefix)] for m in runs[dtype]])
  assert np.all(np.isfinite(values("bfloat16", "alignment/")))
  # bfloat16 rounds each product's operands to 8 significant bits (relative 2^-9); the loss and
  # the cosines are sums of many such products, whose errors average out: after 3 Adam steps
  # of 1e-3 from the same start they stay within one bfloat16 rounding unit (2^-8) of float32.
  np.testing.assert_allclose(values("bfloat16", "loss"), values("float32", "loss"), rtol=2**-8)
  np.testing.assert_allclose(values("bfloat16", "alignment/"), values("float32", "alignment/"),
                             atol=2**-8)
  assert not np.array_equal(values("bfloat16", "loss"), values("float32", "loss"))  # It did.


@pytest.mark.slow
@pytest.mark.parametrize("name, fields", [
    ("resnet20", {"stage_features": (4, 8, 8), "blocks_per_stage": 1}),
    ("vit", {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 16})])
def test_bfloat16_resnet20_and_vit_objectives_are_close_to_float32(name, fields):
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  y = jnp.arange(4)
  init = jax.jit(lambda key: models.init_params(models.create_model(name, **fields), key,
                                               x.shape[1:]))  # Eagerly: 20 s of op dispatch.
  params = init(jax.random.key(0))
  out = {}
  for dtype in (None, "bfloat16"):
    model = models.create_model(name, dtype=dtype, **fields)
    # Two taps: the image and a block's input (every tap costs compile time, not coverage).
    objective = functools.partial(gfa_objective, model.apply, x=x, y=y,
                                  task_loss=objectives.mse("softmax"), layers=("layer0", "layer1"))
    (value, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    out[dtype] = value, np.array([np.mean(c) for c in aux["cosines"].values()]), grads
  (value, cosines, grads), (value16, cosines16, grads16) = out[None], out["bfloat16"]
  assert np.all(np.isfinite(cosines16))
  chex.assert_trees_all_equal_dtypes(grads16, grads)  # float32 gradients of float32 params.
  # As for SmallCNN: within one bfloat16 rounding unit (2^-8) of float32.
  np.testing.assert_allclose(value16, value, rtol=2**-8)
  np.testing.assert_allclose(cosines16, cosines, atol=2**-8)
  assert value16 != value


def test_compute_dtype_is_checked(tiny_config):
  tiny_config.compute_dtype = "float16"
  with pytest.raises(ValueError, match=r"config.compute_dtype='float16' is invalid; choose one"):
    validation.validate_config(tiny_config)
  tiny_config.compute_dtype, tiny_config.model.name = "bfloat16", "resnet18"  # BatchNorm.
  del tiny_config.model["hidden"]
  with pytest.raises(ValueError, match=r"model 'resnet18' computes in float32 only \(bfloat16: "
                     r"small_cnn, mlp, resnet20, vit\)"):
    validation.validate_config(tiny_config)
  tiny_config.model.name, tiny_config.model.dtype = "mlp", "bfloat16"
  with pytest.raises(ValueError, match="config.model.dtype='bfloat16' is invalid; drop it"):
    validation.validate_config(tiny_config)

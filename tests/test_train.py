"""Training: the GFA effect, resume after SIGKILL, data parallelism, NaN guard, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gfa_jax import checkpoints, train_lib
from tests.conftest import REPO, run_python


def read_metrics(workdir, kind):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
def test_beta_raises_alignment_and_beta_zero_does_not(tiny_config, tmp_path):
  tiny_config.num_epochs = 5  # 40 steps.
  gains = {}
  for beta in (0.0, 1.0):
    tiny_config.beta = beta
    workdir = tmp_path / f"beta{beta}"
    train_lib.train_and_evaluate(tiny_config, workdir)
    train_logs = read_metrics(workdir, "train")
    layers = [f"alignment/layer{i}" for i in range(3)]
    alignment = lambda r: np.mean([r[k] for k in layers])
    # Mean of the last three logs against the first (step 4): single batches are noisy.
    gains[beta] = np.mean([alignment(r) for r in train_logs[-3:]]) - alignment(train_logs[0])
  assert gains[1.0] > 0.15, gains
  assert gains[0.0] < 0.05, gains


RUN = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from configs import tiny
    from gfa_jax import train_lib
    config = tiny.get_config()
    config.num_epochs = 3
    train_lib.train_and_evaluate(config, sys.argv[1] if len(sys.argv) > 1 else "{workdir}")
""")

KILL_DURING_SAVE_OF_STEP_12 = textwrap.dedent("""
    import asyncio, os, signal
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def killing_finalize(self, *args, **kwargs):
        # Everything of step 12 is written but not yet committed: die like a preempted job.
        if self.get_final().name == "12":
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
""")


def final_params(workdir):
  _, variables = checkpoints.load_model(workdir)
  return variables["params"]


@pytest.mark.slow
def test_resume_after_sigkill_during_save_equals_uninterrupted_run(tmp_path):
  reference = run_python(RUN.format(workdir=tmp_path / "reference"))
  assert reference.returncode == 0, reference.stderr[-2000:]
  killed = run_python(KILL_DURING_SAVE_OF_STEP_12 + RUN.format(workdir=tmp_path / "resumed"))
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert checkpoints.latest_step(tmp_path / "resumed") == 8  # Step 12 never committed.
  resumed = run_python(RUN.format(workdir=tmp_path / "resumed"))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed at step 8" in resumed.stdout
  chex.assert_trees_all_equal(final_params(tmp_path / "resumed"), final_params(tmp_path / "reference"))
  steps = [r["step"] for r in read_metrics(tmp_path / "resumed", "train")]
  assert steps == sorted(set(steps)), "metrics logged after the last checkpoint must be dropped"


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path):
  code = RUN.format(workdir="unused") + "print(jax.device_count())"
  for devices in (1, 2):
    result = run_python(code.replace('"unused"', f'"{tmp_path}/d{devices}"'), devices=devices)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(str(devices))
  chex.assert_trees_all_close(final_params(tmp_path / "d1"), final_params(tmp_path / "d2"),
                              rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  code = textwrap.dedent(f"""
      from configs import tiny
      from gfa_jax import train_lib
      config = tiny.get_config()
      config.batch_size = 31
      train_lib.train_and_evaluate(config, "{tmp_path}")
  """)
  result = run_python(code, devices=2)
  assert result.returncode != 0
  assert "batch_size=31 does not divide evenly over 2 devices" in result.stderr


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
  tiny_config.learning_rate = 1e30  # Adam's first update at this rate overflows the MLP.
  tiny_config.schedule = "constant"
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+") as error:
    train_lib.train_and_evaluate(tiny_config, tmp_path)
  step = checkpoints.latest_step(tmp_path)
  assert f"last good checkpoint is step {step}" in str(error.value)
  if step is not None:
    chex.assert_tree_all_finite(final_params(tmp_path))


def test_resuming_with_another_config_is_refused(tiny_config, tmp_path):
  tiny_config.num_epochs = 1
  train_lib.train_and_evaluate(tiny_config, tmp_path)
  tiny_config.beta = 0.5
  with pytest.raises(ValueError, match=r"different config \(fields \['beta'\]\)"):
    train_lib.train_and_evaluate(tiny_config, tmp_path)


def test_unknown_config_key_on_the_command_line_is_rejected(tmp_path):
  import subprocess, sys
  from tests.conftest import REPO
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py", "--config.bta=1",
       "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "bta" in result.stderr


def test_sgd_is_heavy_ball_momentum_with_coupled_weight_decay(tiny_config):
  """optimizer=sgd is PyTorch's SGD(momentum=0.9, weight_decay=wd): v = 0.9 v + g + wd p,
  p -= lr v (Nesterov only with config.nesterov)."""
  tiny_config.optimizer, tiny_config.learning_rate = "sgd", 0.1
  tiny_config.weight_decay, tiny_config.schedule = 0.01, "constant"
  tx = train_lib.make_optimizer(tiny_config, steps_per_epoch=10)
  p, g = {"w": jnp.asarray([1.0, -2.0])}, {"w": jnp.asarray([0.5, 0.25])}
  state = tx.init(p)
  v = jnp.zeros(2)
  for _ in range(3):
    updates, state = tx.update(g, state, p)
    v = 0.9 * v + g["w"] + 0.01 * p["w"]
    expected = p["w"] - 0.1 * v
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["w"], expected, rtol=1e-6)


def test_a_run_resumes_on_another_machine_and_from_before_new_fields(tiny_config, tmp_path):
  """data_dir is where the data lives, not part of the run; a config written before a field
  existed matches a config that keeps that field's default."""
  workdir = tmp_path / "run"
  tiny_config.num_epochs = 1
  train_lib.train_and_evaluate(tiny_config, workdir)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["gfa_gradient"], saved["nesterov"], saved["compute_dtype"], saved["download"]
  saved["data_dir"] = "/elsewhere"
  (workdir / "config.json").write_text(json.dumps(saved))
  tiny_config.num_epochs = 2
  with pytest.raises(ValueError, match="num_epochs"):
    train_lib.train_and_evaluate(tiny_config, workdir)
  tiny_config.num_epochs = 1
  train_lib.train_and_evaluate(tiny_config, workdir)  # resumes: nothing differs
  tiny_config.gfa_gradient = "detached"
  with pytest.raises(ValueError, match="gfa_gradient"):
    train_lib.train_and_evaluate(tiny_config, workdir)


def test_nan_parameters_are_never_saved(tiny_config, tmp_path):
  """Issue 16, finding 1: lr 1e38 gives finite loss and gradient at step 1 but NaN parameters;
  no checkpoint may hold them."""
  tiny_config.update({"optimizer": "sgd", "learning_rate": 1e38, "checkpoint_every_steps": 1})
  with pytest.raises(FloatingPointError, match="non-finite"):
    train_lib.train_and_evaluate(tiny_config, tmp_path / "run")
  steps = checkpoints.checkpoint_manager(tmp_path / "run").all_steps()
  for step in steps:
    _, variables = checkpoints.load_model(tmp_path / "run", step=step)
    chex.assert_tree_all_finite(variables)


def test_a_second_trainer_is_refused_and_a_killed_holder_leaves_no_lock(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(  # holds the lock the way a trainer does, then is SIGKILLed
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          sys.path.insert(0, {str(REPO)!r})
          from pathlib import Path
          from gfa_jax import train_lib
          with train_lib.workdir_lock(Path({str(workdir)!r})):
            print("locked", flush=True)
            time.sleep(60)
          """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=f"in use by another trainer \\(PID {holder.pid}\\)"):
      train_lib.train_and_evaluate(tiny_config, workdir)
    assert not (workdir / "config.json").exists()  # refused before anything was written
  finally:
    holder.kill()
    holder.wait()
  tiny_config.num_epochs = 1
  train_lib.train_and_evaluate(tiny_config, workdir)  # the kernel dropped the killed lock
  assert not (workdir / ".lock").exists()


@pytest.mark.slow
def test_two_trainers_started_together_one_runs_one_is_refused(tmp_path):
  """The race of the issue: two real train.py processes on one workdir at the same moment."""
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         "--config.num_epochs=3"]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], results
  refused = next(err for code, err in results if code == 2)
  error_lines = [line for line in refused.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "in use by another trainer (PID" in error_lines[0], refused
  assert "Traceback" not in refused
  steps = [r["step"] for r in read_metrics(workdir, "train")]
  assert steps == sorted(set(steps)) and steps[-1] == 3 * 8  # each step logged once, in order
  assert not (workdir / ".lock").exists()


@pytest.mark.slow
def test_resume_survives_a_partial_metrics_line_and_a_damaged_checkpoint(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  tiny_config.num_epochs = 1
  train_lib.train_and_evaluate(tiny_config, workdir)
  manager = checkpoints.checkpoint_manager(workdir)
  latest, older = sorted(manager.all_steps())[-1], sorted(manager.all_steps())[-2]
  for f in (workdir / "checkpoints" / str(latest)).rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated copy
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 99, "kind": "tr')  # what SIGKILL during an append leaves
  with pytest.warns(UserWarning, match="damaged checkpoint"):
    final = train_lib.train_and_evaluate(tiny_config, workdir)
  assert np.isfinite(final["test/accuracy"])
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines if '"train"' in l][-1] == latest  # retrained
  assert older < latest


def test_evals_log_alignment_for_gfa_or_when_asked(tiny_config, tmp_path):
  """The eval step pays GFA's extra backward pass only for a tapped objective or with
  eval_alignment; asking for it changes no other metric and does not block a resume."""
  tiny_config.update({"objective": "standard", "num_epochs": 1})
  plain = train_lib.train_and_evaluate(tiny_config, tmp_path / "plain")
  assert "test/task_loss" in plain and not [k for k in plain if "alignment" in k]
  tiny_config.eval_alignment = True
  asked = train_lib.train_and_evaluate(tiny_config, tmp_path / "asked")
  assert {f"{s}/alignment/layer{i}" for s in ("train", "test") for i in range(4)} <= set(asked)
  assert asked["test/accuracy"] == plain["test/accuracy"]
  train_lib.train_and_evaluate(tiny_config, tmp_path / "plain")  # resumes: nothing to train

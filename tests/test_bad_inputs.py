"""Bad input through the command lines: one line `error: ...`, exit 2, no traceback, and no
file written or changed (issue 16). Each case runs train.py / eval.py in a fresh process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PARAMS = "results/pgd_at/params.msgpack"
TRAIN = [sys.executable, "train.py", "--config", "configs/tiny.py"]
EVAL = [sys.executable, "eval.py", "--workdir", PARAMS, "--num_examples", "8"]

CASES = {
    # train.py: config values, checked before the workdir exists.
    "unknown tap": TRAIN + ["--config.gfa_layers=('layer0','layer9')"],
    "unknown task loss": TRAIN + ["--config.task_loss=hinge"],
    "unknown objective": TRAIN + ["--config.objective=magic"],
    "zero checkpoint period": TRAIN + ["--config.checkpoint_every_steps=0"],
    "zero log period": TRAIN + ["--config.log_every_steps=0"],
    "negative learning rate": TRAIN + ["--config.learning_rate=-0.1"],
    "zero learning rate": TRAIN + ["--config.learning_rate=0.0"],
    "zero batch": TRAIN + ["--config.batch_size=0"],
    "zero epochs": TRAIN + ["--config.num_epochs=0"],
    "zero gfa eps": TRAIN + ["--config.gfa_eps=0.0"],
    "unknown gradient reading": TRAIN + ["--config.gfa_gradient=stopped"],
    "unknown direction": TRAIN + ["--config.gfa_direction=down"],
    "unknown optimizer": TRAIN + ["--config.optimizer=lbfgs"],
    "unknown schedule": TRAIN + ["--config.schedule=step"],
    "unknown data source": TRAIN + ["--config.data_source=imagenet"],
    "unknown model": TRAIN + ["--config.model.name=resnet1000"],
    "wrong layer weights": TRAIN + ["--config.gfa_layer_weights=(1.0,)"],
    "negative beta": TRAIN + ["--config.beta=-1.0"],
    "data folder without data": TRAIN + ["--config.data_source=cifar10", "--config.data_dir=/nonexistent"],
    "unknown config key": TRAIN + ["--config.betta=0.1"],
    "non-number": TRAIN + ["--config.learning_rate=fast"],
    "missing config file": [sys.executable, "train.py", "--config", "configs/nope.py"],
    "stray argument": TRAIN + ["extra"],
    "zero adversary steps": TRAIN + ["--config.adversary.steps=0"],
    "zero checkpoints kept": TRAIN + ["--config.max_to_keep=0"],
    "zero eval batch": TRAIN + ["--config.eval_batch_size=0"],
    "negative crop": TRAIN + ["--config.crop_padding=-1"],
    "negative weight decay": TRAIN + ["--config.weight_decay=-0.1"],
    "unknown reduction": TRAIN + ["--config.gfa_reduction=max"],
    "unknown mse outputs": TRAIN + ["--config.mse_outputs=probs"],
    "no tapped layer": TRAIN + ["--config.gfa_layers=()"],
    "zero-width layer": TRAIN + ["--config.model.hidden=(0,)"],
    # train.py / eval.py: a multi-process launch line missing a part (gfa_jax.distributed).
    "processes without an id": TRAIN + ["--num_processes", "2",
                                        "--coordinator_address", "127.0.0.1:1"],
    "process id out of range": TRAIN + ["--num_processes", "2", "--process_id", "2",
                                        "--coordinator_address", "127.0.0.1:1"],
    "eval processes without a coordinator": EVAL + ["--attack", "fgsm", "--num_processes", "2",
                                                    "--process_id", "0"],
    # eval.py: flags checked before any attack runs.
    "zero eval batch size": EVAL + ["--attack", "fgsm", "--batch_size", "0"],
    "unknown custom attack": EVAL + ["--attack", "autoattack", "--aa_version", "custom",
                                     "--aa_attacks", "apgd-ce,bogus"],
    "compilation cache is a file": EVAL + ["--attack", "fgsm", "--compilation_cache_dir",
                                           "README.md"],
    "subset of words": EVAL + ["--attack", "fgsm", "--subset", "README.md"],
    "checklist with a curve": EVAL + ["--attack", "checklist", "--eps", "1/255,2/255"],
    "output is a folder": EVAL + ["--attack", "fgsm", "--output", "results"],
    "step on a params-only file": EVAL + ["--attack", "fgsm", "--step", "3"],
    "empty eps entry": EVAL + ["--attack", "fgsm", "--eps", "1/255,,2/255"],
    "no attack": EVAL,
    "unknown attack": EVAL + ["--attack", "pgdd"],
    "unknown norm": EVAL + ["--attack", "pgd", "--norm", "l3"],
    "bad eps": EVAL + ["--attack", "pgd", "--eps", "8/0"],
    "negative eps": EVAL + ["--attack", "pgd", "--eps", "-0.1"],
    "norm not supported": EVAL + ["--attack", "cw", "--norm", "linf"],
    "missing checkpoint": [sys.executable, "eval.py", "--workdir", "nowhere/params.msgpack",
                           "--attack", "fgsm"],
    "zero examples": EVAL + ["--attack", "fgsm", "--num_examples", "0"],
    "missing torch model": [sys.executable, "eval.py", "--torch_model", "nowhere.pt",
                            "--attack", "fgsm"],
    # Issue 36: found before the attack, not after it (the result location) or never.
    "eps overflows a float": EVAL + ["--attack", "fgsm", "--eps", "1e400"],
    "output under a file": EVAL + ["--attack", "fgsm", "--output", "README.md/out.json"],
    "data folder without CIFAR-10": EVAL + ["--attack", "fgsm", "--data_dir", "/nonexistent"],
    "backend this machine lacks": EVAL + ["--attack", "fgsm"],
}
# Environment of a case, over the test's own (JAX_PLATFORMS=cpu).
ENV = {"backend this machine lacks": {"JAX_PLATFORMS": "gpu"}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path):
  workdir = tmp_path / "run"
  argv = CASES[name]
  if argv[1] == "train.py":
    argv = argv + ["--workdir", str(workdir)]
  else:
    argv = argv + ([] if "--output" in argv else ["--output", str(tmp_path / "out.json")])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **ENV.get(name, {})}
  env.pop("GFA_DATA_DIR", None)
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert len(errors) == 1 and len(errors[0]) > 30, result.stderr[-2000:]
  assert not workdir.exists() and not (tmp_path / "out.json").exists()
  assert not list(tmp_path.glob("*.tmp"))


def _env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
  env.pop("GFA_DATA_DIR", None)
  return env


def _one_error_line(stderr: str) -> str:
  errors = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, stderr[-2000:]
  assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr[-2000:]
  return errors[0]


def test_ctrl_c_stops_training_with_one_line_saying_how_to_resume(tmp_path):
  # Python's KeyboardInterrupt during compilation or a step crashed the interpreter at exit
  # ("Fatal Python error: Segmentation fault") in 3 of 5 tries (issue 36).
  argv = TRAIN + ["--workdir", str(tmp_path / "run")]
  process = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline().startswith("Training"), process.communicate()[1][-2000:]
  time.sleep(0.5)  # Compiling the train step (seconds), or running it.
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, (process.returncode, stderr[-2000:])
  assert "resume" in _one_error_line(stderr)


def test_data_dir_a_run_on_the_embedded_subset_ignores_is_refused(tmp_path, tiny_config):
  # The user would believe they evaluated their folder (issue 36).
  from gfa_jax import checkpoints, models
  model = models.from_config(tiny_config.model)
  path = tmp_path / "params.msgpack"
  checkpoints.export_params(path, tiny_config,
                            models.init_params(model, jax.random.key(0), (32, 32, 3)))
  argv = [sys.executable, "eval.py", "--workdir", str(path), "--attack", "fgsm",
          "--num_examples", "8", "--data_dir", str(tmp_path)]
  result = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "embedded" in _one_error_line(result.stderr)
  assert not (tmp_path / "eval").exists()


def test_a_config_that_cannot_build_its_model_is_one_line(tmp_path, tiny_config):
  # A hand-edited config (issue 36: "abc" where a tuple of widths belongs) failed with a
  # TypeError from inside Flax.
  from gfa_jax import checkpoints
  tiny_config.model = ml_collections.ConfigDict({**tiny_config.model.to_dict(), "hidden": "abc"})
  path = tmp_path / "params.msgpack"
  checkpoints.export_params(path, tiny_config, {"w": np.zeros(2, np.float32)})
  argv = [sys.executable, "eval.py", "--workdir", str(path), "--attack", "fgsm",
          "--num_examples", "8"]
  result = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "cannot build the model" in _one_error_line(result.stderr)

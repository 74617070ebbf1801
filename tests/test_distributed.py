"""Multi-process training for real on one machine: two train.py processes on 127.0.0.1, one
CPU device each, gloo collectives, against one process with two devices (issue 18, part 4)."""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from gfa_jax import checkpoints, distributed
from tests.conftest import REPO

# The slow set (make test-slow; CI runs it too): several processes.
pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "train.py", "--config", "configs/tiny.py"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_"))}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def final_params(workdir):
  _, variables = checkpoints.load_model(workdir)
  return jax.tree.map(np.asarray, variables)


def test_two_processes_train_the_parameters_of_one_process_with_two_devices(tmp_path):
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  subprocess.run(TRAIN + ["--workdir", str(single)], cwd=REPO, check=True, capture_output=True,
                 timeout=300, env=environment(
                     XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  port = free_port()
  procs = [subprocess.Popen(TRAIN + ["--workdir", str(multi)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment(
                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"))
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  # Process 0 logs and writes; process 1 computes only.
  assert "2 device(s) [cpu] in 2 processes" in outputs[0][0]
  assert "Training" not in outputs[1][0]
  # The same parameters (the gradient all-reduce runs in gloo instead of in one process, so
  # the float32 sums may round differently).
  chex.assert_trees_all_close(final_params(multi), final_params(single), rtol=1e-5, atol=1e-6)
  # One metrics line per event, as in the one-process run, and the same evaluations.
  lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in lines] == [(r["step"], r["kind"]) for r in reference]
  for got, want in zip(lines, reference):
    if got["kind"] == "eval":
      assert got.keys() == want.keys()
      for key in set(want) - {"kind"}:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
  assert not (multi / ".lock").exists()


def test_one_process_is_not_distributed(monkeypatch):
  for name in (*distributed.ENV, "SLURM_STEP_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv("SLURM_NTASKS", "4")  # inside an allocation but not under srun
  assert distributed.initialize() is False


@pytest.mark.parametrize("kwargs,message", [
    ({"num_processes": 2, "coordinator_address": "h:1"}, "no process_id"),
    ({"num_processes": 2, "process_id": 0}, "no coordinator_address"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, r"not in \[0, 2\)"),
    ({"process_id": 0}, "num_processes is None"),
])
def test_an_incomplete_launch_line_is_refused(monkeypatch, kwargs, message):
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)

"""load_model on workdirs and params-only files, and its errors."""

import shutil

import chex
import jax
import numpy as np
import pytest

from gfa_jax import checkpoints, train_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from configs import tiny
  config = tiny.get_config()
  config.num_epochs = 1
  path = tmp_path_factory.mktemp("run")
  train_lib.train_and_evaluate(config, path)
  return path


def test_workdir_and_exported_file_give_the_same_logits(workdir, tmp_path):
  apply_fn, variables = checkpoints.load_model(workdir)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  logits = apply_fn(variables, x)
  chex.assert_shape(logits, (3, 10))
  exported = tmp_path / "model.msgpack"
  config = checkpoints.load_run_config(workdir)
  checkpoints.export_params(exported, config, variables["params"], {"step": 8})
  assert checkpoints.load_run_config(exported) == config
  apply_file, variables_file = checkpoints.load_model(exported)
  np.testing.assert_array_equal(apply_file(variables_file, x), logits)
  assert checkpoints.latest_step(workdir) == 8
  _, older = checkpoints.load_model(workdir, step=4)
  assert not np.array_equal(apply_fn(older, x), logits)


def test_missing_paths_and_steps_are_clear_errors(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.load_model(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="not a gfa-jax training workdir"):
    checkpoints.load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 .*available: \[4, 8\]"):
    checkpoints.load_model(workdir, step=5)


def test_corrupt_checkpoints_are_clear_errors(workdir, tmp_path):
  garbage = tmp_path / "garbage.msgpack"
  garbage.write_bytes(b"\x00not msgpack")
  with pytest.raises(ValueError, match="not a readable params-only checkpoint"):
    checkpoints.load_model(garbage)
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  for f in (broken / "checkpoints" / "8" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"corrupt")
  with pytest.raises(ValueError, match="could not be restored"):
    checkpoints.load_model(broken)

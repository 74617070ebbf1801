"""load_model on workdirs and params-only files, and its errors."""

import errno
import shutil
import tempfile
import types
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from gfa_jax import checkpoints, train_lib
from tests.conftest import run_python


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


def _resume(workdir):
  """train_and_evaluate on a copy of the fixture's run: it restores before training anything."""
  from configs import tiny
  config = tiny.get_config()
  config.num_epochs = 1
  return train_lib.train_and_evaluate(config, workdir)


def test_an_unreadable_checkpoint_is_reported_not_set_aside(workdir, tmp_path, monkeypatch):
  # A permission error is not damage: the intact checkpoint must stay where it is, and its
  # steps must not be retrained in silence (issue 36). Tests run as root, whom chmod does not
  # stop, so the reader is made to refuse the way the OS would.
  run = tmp_path / "run"
  shutil.copytree(workdir, run)

  def refuse(self, step, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", f"{self.directory}/{step}/params")
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", refuse)
  with pytest.raises(PermissionError, match="not readable by this user.*left as it is"):
    _resume(run)
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
  assert not (run / "damaged_checkpoints").exists()


def test_a_chmod_000_checkpoint_is_reported_not_set_aside(workdir):
  # The real thing: files of the newest checkpoint mode 000, read by a user who may not read
  # them. Root reads them anyway, so the process drops to nobody (uid 65534) before resuming;
  # the run lives in a fresh temporary folder (pytest's own are private to their owner).
  top = Path(tempfile.mkdtemp())
  try:
    _check_unreadable_checkpoint(workdir, top)
  finally:
    for path in top.rglob("*"):
      path.chmod(0o777)
    shutil.rmtree(top)


def _check_unreadable_checkpoint(workdir, top):
  run = top / "run"
  shutil.copytree(workdir, run)
  for path in [top, *run.rglob("*"), run]:
    path.chmod(0o777 if path.is_dir() else 0o666)
  for f in (run / "checkpoints" / "8" / "params").rglob("*"):
    if f.is_file():
      f.chmod(0)
  result = run_python(f"""
import encodings.cp437  # Loaded lazily by zipfile, from a folder nobody may not read.
import os
import jax
from configs import tiny
from gfa_jax import train_lib
config = tiny.get_config()
config.num_epochs = 1
jax.devices()
if os.geteuid() == 0:
  os.setegid(65534)
  os.seteuid(65534)
try:
  train_lib.train_and_evaluate(config, {str(run)!r})
except PermissionError as e:
  print("refused:", e)
""")
  assert "refused: checkpoint" in result.stdout and "not readable" in result.stdout, (
      result.stdout[-1000:], result.stderr[-2000:])
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
  assert not (run / "damaged_checkpoints").exists()


def test_a_full_disk_during_a_save_is_one_error_and_leaves_no_partial_folder(
    workdir, tmp_path, monkeypatch):
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  manager = checkpoints.checkpoint_manager(run)

  def fill_disk(self, step, *args, **kwargs):  # What Orbax leaves when the disk fills up.
    (self.directory / f"{step}.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", fill_disk)
  state = types.SimpleNamespace(params={"w": np.ones(3, np.float32)}, opt_state={}, model_state={})
  with pytest.raises(OSError, match="disk may be full.*last good checkpoint is step 8"):
    checkpoints.save_train_state(manager, state, 12, run)
  assert not list((run / "checkpoints").glob("*tmp*"))
  manager.close()

"""A training run's folder: the trainer's lock, ``metrics.jsonl``, and the config check on resume.

Exists apart from train_lib so the training loop reads as the loop: these are the file-level
guarantees around it (one trainer per folder, no metrics from after the last checkpoint, no
resume with another config).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import ml_collections

from gfa_jax import checkpoints, objectives, reporting


def write_metrics(path: Path, record: dict) -> None:
  """Appends ``record`` to metrics.jsonl as one JSON line; returns None."""
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def drop_metrics_after(path: Path, step: int) -> None:
  """On resume, forget metrics a killed run logged after its last checkpoint (the resumed run
  logs those steps again); returns None."""
  if path.exists():
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # A SIGKILL during an append leaves a partial last line.
        warnings.warn(f"{path}: dropping unreadable line {number} ({line[:40]!r})", stacklevel=3)
        continue
      if record.get("step", 0) <= step:
        lines.append(line)
    reporting.write_atomically(path, "".join(l + "\n" for l in lines).encode())


def check_config_matches(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the fields if ``workdir`` holds a run of another config:
  resuming it would silently mix two runs. Returns None (also for a new workdir)."""
  if not (workdir / "config.json").exists():
    return
  old = checkpoints.load_run_config(workdir).to_dict()
  new = json.loads(config.to_json_best_effort())
  # Where the data lives or came from is not part of the run (a committed run resumes on
  # another machine, a downloaded copy is the same data), nor is what evaluations log (it
  # changes no parameter), and a field added to the config since the run started matches if
  # it keeps its default.
  same = lambda k: (old.get(k, objectives.ADDED_FIELDS.get(k)) == new.get(k)
                    or k in ("data_dir", "download", "eval_alignment"))
  differing = sorted(k for k in set(old) | set(new) if not same(k))
  if differing:
    raise ValueError(
        f"{workdir} holds a run with a different config (fields {differing}); resume it with "
        "the same config, or pass a new --workdir.")


# A result JSON of a large evaluation is megabytes: a disk with less free is as good as full.
MIN_FREE_BYTES = 16 << 20


def check_writable(path: str | Path, *, folder: bool = False) -> None:
  """Raises OSError (ValueError for a folder given as a file) unless a result can be written
  at ``path`` (a file; with ``folder``, a folder to write files into); returns None and leaves
  nothing behind.

  Why: eval.py writes its result after the attack, and an hours-long AutoAttack whose JSON
  cannot be written (read-only or full disk, a parent that is a file, a file path that is a
  folder) is lost. The check writes and removes a probe file in the target folder, creating
  and then removing any missing parents, which is what the real write will need.
  """
  path = Path(path)
  target = path if folder else path.parent
  if not folder and path.is_dir():
    raise ValueError(f"the result path {path} is a folder; give the file to write (e.g. "
                     f"{path / 'result.json'})")
  if folder and path.exists() and not path.is_dir():
    raise ValueError(f"the result folder {path} is a file; give a folder (created if missing)")
  missing = [p for p in [target, *target.parents] if not p.exists()][::-1]  # outermost first
  created = []
  try:
    for parent in missing:
      parent.mkdir()
      created.append(parent)
    fd, probe = tempfile.mkstemp(dir=target, prefix=".write-probe-")
    try:
      os.write(fd, b"\0" * 65536)
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
    free = shutil.disk_usage(target).free
    if free < MIN_FREE_BYTES:
      raise OSError(errno.ENOSPC, f"only {free >> 10} KiB free")
  except OSError as e:
    raise OSError(f"cannot write the result to {path} ({e.strerror or e}); choose another "
                  "--output or free the disk / fix the folder's permissions (checked before "
                  "the work, so nothing was lost)") from e
  finally:
    for parent in reversed(created):
      parent.rmdir()


@contextlib.contextmanager
def workdir_lock(workdir: Path):
  """Holds an exclusive `flock` on ``workdir/.lock`` (which names the holder's PID) while a
  trainer writes there: a second trainer on the same folder is refused at once, naming the
  first. The kernel drops the lock when its process ends however it ends (SIGKILL included),
  so a killed run leaves nothing to clean up; there is no PID check that two starters could
  race through. Released, and the file removed, on any exit."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / ".lock"
  while True:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise ValueError(f"{workdir} is in use by another trainer (PID {holder}); wait for it, "
                       "stop it, or pass another --workdir") from None
    # The holder we waited on may have removed the file after we opened it: our lock is then
    # on an orphan inode, and a third trainer could lock the new file. Only the file that is
    # still at `path` counts.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    yield
  finally:
    path.unlink(missing_ok=True)  # Before the unlock, so a waiter never locks a removed file.
    os.close(fd)

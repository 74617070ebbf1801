"""One error path for the command lines (train.py, eval.py).

Every expected failure (a bad flag or config value, missing or corrupt data or checkpoint,
training that turned non-finite) prints one line, ``error: <what> — <how to fix>``, and exits
with status 2; a traceback means a bug (``--verbose`` shows it for expected failures too).
Unattended sweeps of hundreds of jobs then fail at once, legibly, in their logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from collections.abc import Callable

import jax
from absl import app, flags

from gfa_jax import checkpoints, distributed

# Failures that come from what the user asked for, not from a bug here.
# OSError: missing files, and ml_collections' lazily loaded --config file.
EXPECTED = (ValueError, OSError, FloatingPointError, ImportError, KeyError)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an expected error too.")
# One of several processes (gfa_jax.distributed; unset: the environment, SLURM or Open MPI say).
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's number, 0 to N - 1.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 in a multi-process run.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Folder of JAX's persistent compilation cache: a later run "
    "of the same attacks or training step on the same shapes loads its compiled programs "
    "instead of compiling them again (default: $JAX_COMPILATION_CACHE_DIR, else off).")


def one_line(error: BaseException) -> str:
  """The error's message on one line, as ``<what> — <how to fix>``: a message of the form
  "what; fix" gets the dash, one that has neither is returned as it is."""
  text = str(error).replace("\\n", " ").replace("\\'", "'").strip().strip("'\"")
  text = " ".join(text.split()) or type(error).__name__
  if isinstance(error, KeyError):
    text = f"missing key {text}"
  if " — " not in text and "; " in text:
    text = text.replace("; ", " — ", 1)
  return text


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  # ml_collections' config flags raise OSError (missing config file) and AttributeError
  # (unknown field) from inside the parser.
  except (flags.Error, OSError, AttributeError, ValueError) as e:
    fail(f"{one_line(e)} — see {argv[0]} --helpfull for the flags and their values")
  return []  # Not reached.


def use_compilation_cache(path: str | None) -> None:
  """Points JAX's persistent compilation cache at ``path`` (None: leave JAX's own setting,
  which reads $JAX_COMPILATION_CACHE_DIR).

  Why: an AutoAttack evaluation compiles one program per attack and per power-of-two batch the
  shrinking sets of robust points meet (about a fifth of APGD-T's time on 200 images); sweeps
  evaluate many checkpoints of one architecture with the same shapes, so from the second run
  on those programs come from disk. Programs that compile in under JAX's threshold
  (``jax_persistent_cache_min_compile_time_secs``, 1 s) are not stored: they cost less to
  compile than to look up.
  """
  if path is None:
    return
  if Path(path).exists() and not Path(path).is_dir():
    raise ValueError(f"--compilation_cache_dir {path} is a file; pass a folder (it is created "
                     "if missing)")
  jax.config.update("jax_compilation_cache_dir", str(path))


def _backend_missing(error: RuntimeError) -> bool:
  """Whether JAX failed to start the platform $JAX_PLATFORMS names (e.g. gpu without one)."""
  text = str(error).lower()
  return "backend" in text and ("platform" in text or "unknown backend" in text)


def stop_on_interrupt(resume: str) -> None:
  """Makes Ctrl-C (SIGINT) print one line, ``error: interrupted — <resume>``, and end the
  process at once with status 130; returns None.

  Why not Python's KeyboardInterrupt: it surfaces wherever the main thread next runs Python
  (inside a jit trace, between XLA calls, during an Orbax save), unwinds through code that
  does not expect it, and leaves XLA's compile threads and Orbax's background threads running
  into interpreter shutdown, which then crashes ("Fatal Python error: Segmentation fault").
  Ending at once is what a kill does, which every file here survives: checkpoints and results
  are written to temporary names and renamed, metrics after the last checkpoint are dropped on
  resume, and the workdir lock is the kernel's.
  """
  def interrupted(signum, frame):
    del signum, frame
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    # A progress bar may hold the cursor mid-line: the error starts on a line of its own.
    os.write(2, f"\nerror: interrupted (Ctrl-C) — {resume}\n".encode())
    os._exit(130)
  signal.signal(signal.SIGINT, interrupted)


def run(main: Callable[[list[str]], None], *,
        resume: str = "rerun the same command to start again") -> None:
  """``absl.app.run(main)`` with flag errors and EXPECTED exceptions as one line, exit 2, and
  Ctrl-C as one line naming ``resume`` (how to carry on), exit 130."""
  def wrapped(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]} — every option is a --flag (see --helpfull)")
    stop_on_interrupt(resume)
    try:
      use_compilation_cache(_CACHE_DIR.value)
      # Before the first computation, as JAX requires; a bad launch line is one line too.
      distributed.initialize(_NUM_PROCESSES.value, _PROCESS_ID.value, _COORDINATOR.value)
      main(argv)
    except EXPECTED as e:
      if _VERBOSE.value:
        raise
      fail(one_line(e))
    except RuntimeError as e:
      if _VERBOSE.value or not _backend_missing(e):
        raise
      fail(f"JAX could not start the backend $JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')} "
           f"asks for ({one_line(e)[:160]}) — unset JAX_PLATFORMS to use what this machine "
           "has, or set JAX_PLATFORMS=cpu")
    finally:
      # Orbax managers left open would run their threads into interpreter shutdown.
      checkpoints.close_all()
  app.run(wrapped, flags_parser=_parse_flags)


def read_indices(path: str) -> list[int]:
  """Example indices from a JSON list or whitespace/comma-separated integers ('#' comments):
  eval.py's --subset file."""
  text = Path(path).read_text()
  try:
    values = json.loads(text)
  except json.JSONDecodeError:
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    values = " ".join(lines).replace(",", " ").split()
  ints = []
  for v in values if isinstance(values, list) else [values]:
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.isdigit())):
      raise ValueError(f"--subset {path}: {v!r} is not an example index; write integers >= 0 "
                       "(a JSON list or whitespace/comma separated)")
    ints.append(int(v))
  return ints

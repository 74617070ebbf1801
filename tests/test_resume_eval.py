"""A killed evaluation resumes where it stopped and returns the uninterrupted run's result
(issue 34, part 1): evaluate(..., resume_dir=...) on a tiny MLP, SIGKILLed at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import batching, eval_units, evaluate
from gfa_jax.attacks import autoattack
from tests.conftest import REPO

N, BATCH, EPS = 24, 4, [0.03]
# Few steps, queries and targets: a CI-sized AutoAttack that still runs every stage.
CHEAP = {"steps": 5, "n_queries": 30, "num_targets": 3}
TIMING = ("elapsed_seconds", "stage_seconds", "stage_compile_seconds")


def _mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
  return h @ params["w2"]


def problem():
  """(logits_fn, images, labels): a random tanh MLP (4 classes), labels its predictions but
  three, on images in [0.2, 0.8]."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  params = {"w1": jax.random.normal(k1, (48, 16)) * 0.6, "w2": jax.random.normal(k2, (16, 4))}
  logits_fn = batching.bind(_mlp, params)
  x = np.asarray(jax.random.uniform(k3, (N, 4, 4, 3), minval=0.2, maxval=0.8))
  y = np.asarray(logits_fn(x)).argmax(-1)
  y[:3] = (y[:3] + 1) % 4
  return logits_fn, x, y


def cheap_attacks():
  """AutoAttack's attack table with `CHEAP` settings (the same attacks and sequence)."""
  return {name: (fn, tuple((k, CHEAP.get(k, v)) for k, v in hp))
          for name, (fn, hp) in autoattack.ATTACKS.items()}


def run(attack, resume_dir=None, seed=0):
  """evaluate() of `attack` ('autoattack': standard, cheap; 'apgd': 5 steps) on `problem`."""
  logits_fn, x, y = problem()
  overrides = {"steps": CHEAP["steps"]} if attack == "apgd" else None
  return evaluate.evaluate(logits_fn, x, y, attack=attack, eps=EPS, batch_size=BATCH, seed=seed,
                           overrides=overrides, progress=False, resume_dir=resume_dir)


def without_timings(report):
  """The report without wall times (the only fields a resumed run may change)."""
  report = {k: v for k, v in report.items() if k not in TIMING}
  report["attacks"] = {name: {k: v for k, v in r.items() if k not in TIMING}
                       for name, r in report["attacks"].items()}
  return report


# Runs `run` in a fresh process, the cheap attack table installed; argv: attacks (comma-
# separated), progress folder (one subfolder per attack), output JSON ({attack: report}).
SCRIPT = """
import sys
from gfa_jax import distributed, reporting
from gfa_jax.attacks import autoattack
from tests import test_resume_eval as t
distributed.initialize()
autoattack.ATTACKS.update(t.cheap_attacks())
reports = {a: t.run(a, resume_dir=f"{sys.argv[2]}/{a}") for a in sys.argv[1].split(",")}
if distributed.is_primary():
  reporting.write_json(sys.argv[3], reports)
"""


def start(attacks, resume_dir, out, **env):
  environment = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  # One compilation cache for the runs of a test: a resumed run compiles nothing again.
  environment.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                     JAX_COMPILATION_CACHE_DIR=str(Path(resume_dir).parent / "jax_cache"),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
  return subprocess.Popen([sys.executable, "-c", SCRIPT, attacks, str(resume_dir), str(out)],
                          cwd=REPO, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def units(folder):
  return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}


@pytest.mark.slow
def test_a_killed_autoattack_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  monkeypatch.setattr(autoattack, "ATTACKS", cheap_attacks())
  reference = run("autoattack")
  breakdown = reference["attacks"]["autoattack"]
  # Every stage attacks some points, and the sequence leaves some robust: a real test.
  assert 0 < reference["robust_accuracy"][0] < reference["clean_accuracy"]
  assert set(breakdown["broken_by"][0]) - {None, "clean"}, breakdown["broken_by"]

  folder, out = tmp_path / "progress" / "autoattack", tmp_path / "out.json"
  rng, kills, seen = random.Random(0), 0, 0
  for _ in range(3):  # kill at a random moment after a new unit is stored
    proc = start("autoattack", tmp_path / "progress", out)
    while proc.poll() is None and len(units(folder)) <= seen:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate(timeout=300)
    seen = len(units(folder))
  assert kills >= 1 and not out.exists()
  before = units(folder)
  proc = start("autoattack", tmp_path / "progress", out)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  after = units(folder)
  # Finished units were loaded, not computed (and stored) again.
  assert all(after[name] == mtime for name, mtime in before.items())
  assert any(".1-apgd-t.call" in name for name in after), sorted(after)[:5]
  assert without_timings(json.loads(out.read_text())["autoattack"]) == without_timings(
      json.loads(json.dumps(reference)))


def test_an_interrupted_apgd_resumes_from_its_stored_batches(tmp_path):
  reference = run("apgd")
  folder = tmp_path / "progress"
  run("apgd", resume_dir=folder)
  stored = sorted(folder.glob("*.npz"))
  assert [p.name for p in stored][:2] == ["apgd.eps0.call0.b000000.npz",
                                          "apgd.eps0.call0.b000001.npz"]
  # Lose the last half of the units (a kill stores whole units only), then resume: the same.
  for path in stored[len(stored) // 2:]:
    path.unlink()
  resumed = run("apgd", resume_dir=folder)
  assert without_timings(resumed) == without_timings(reference)


def test_another_request_on_the_same_progress_folder_is_refused(tmp_path):
  run("apgd", resume_dir=tmp_path / "p")
  with pytest.raises(ValueError, match=r"differs in seed\).*delete"):
    run("apgd", resume_dir=tmp_path / "p", seed=1)


@pytest.mark.slow
def test_eval_command_line_resumes_refuses_another_request_and_cleans_up(tmp_path):
  import ml_collections

  from configs import tiny
  from gfa_jax import checkpoints, data, models
  config = tiny.get_config()
  config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (8,)})
  params = models.init_params(models.from_config(config.model), jax.random.key(0),
                              data.image_shape(config.data_source))
  checkpoints.export_params(tmp_path / "model.msgpack", config, params)
  out, progress = tmp_path / "out.json", tmp_path / "out.json.progress"

  def eval_py(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GFA_DATA_DIR": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "eval.py"), "--workdir",
                           str(tmp_path / "model.msgpack"), "--attack", "apgd", "--num_examples",
                           "8", "--batch_size", "4", "--output", str(out), *flags], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)

  first = eval_py("--keep_progress")
  assert first.returncode == 0, first.stderr[-2000:]
  assert (progress / "manifest.json").exists() and list(progress.glob("apgd.eps0.*.npz"))
  other = eval_py("--seed", "1")
  assert other.returncode == 2 and "error:" in other.stderr and "differs in seed" in other.stderr
  assert "delete" in other.stderr.splitlines()[-1]
  report = json.loads(out.read_text())
  again = eval_py()
  assert again.returncode == 0, again.stderr[-2000:]
  assert not progress.exists()  # deleted once the JSON is written
  resumed = json.loads(out.read_text())
  for key in ("still_robust", "clean_correct", "robust_accuracy"):
    assert resumed[key] == report[key], key


def test_a_folder_without_finished_units_is_taken_over_by_a_corrected_request(tmp_path):
  eval_units.UnitStore(tmp_path, {"seed": 0})  # e.g. a run whose flags failed before batch 0
  store = eval_units.UnitStore(tmp_path, {"seed": 1})
  store.save("apgd.eps0.call0.b000000", np.ones(3, np.float32))
  with pytest.raises(ValueError, match=r"differs in seed\)"):
    eval_units.UnitStore(tmp_path, {"seed": 2})
  np.testing.assert_array_equal(
      eval_units.UnitStore(tmp_path, {"seed": 1}).load("apgd.eps0.call0.b000000"), np.ones(3))

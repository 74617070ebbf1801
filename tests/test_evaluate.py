"""gfa_jax.evaluate and eval.py on linear models, where robust accuracy is known in closed form."""

import dataclasses
import json
import os
from pathlib import Path
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gfa_jax import checkpoints, evaluate, models, reporting
from gfa_jax.attacks.fgsm import fgsm

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 3)
N = 12


def linear_problem(num_classes, seed=0, scale=4.0):
  """A linear model on interior images, labels = its predictions except two flipped ones.

  Returns (logits_fn, x, y, clean_correct, distances) with distances[norm] the exact distance of
  each x to the decision boundary (min_j (z_y - z_j) / ||w_y - w_j||_dual); the [0, 1] box never
  binds because x lies in [0.3, 0.7] and every distance is below 0.3.
  """
  key_w, key_x = jax.random.split(jax.random.key(seed))
  w = np.asarray(jax.random.normal(key_w, (int(np.prod(SHAPE)), num_classes))) * scale
  logits_fn = lambda v: (v.reshape(v.shape[0], -1) - 0.5) @ w
  x = np.asarray(jax.random.uniform(key_x, (N, *SHAPE), minval=0.3, maxval=0.7))
  z = np.asarray(logits_fn(x))
  y = z.argmax(1)
  y[:2] = (y[:2] + 1) % num_classes  # two examples misclassified before any attack
  clean_correct = z.argmax(1) == y
  margins = z[np.arange(N), y][:, None] - z  # [N, K]
  dw = w[:, y].T[:, None, :] - w.T[None]  # [N, K, D]
  distances = {}
  for norm, dual in (("linf", 1), ("l2", 2)):
    d = margins / np.maximum(np.linalg.norm(dw, ord=dual, axis=-1), 1e-12)
    d[np.arange(N), y] = np.inf
    distances[norm] = d.min(1)
  assert max(d[clean_correct].max() for d in distances.values()) < 0.3
  return logits_fn, x, y, clean_correct, distances


def eps_between(d, count=3, gap=1.08):
  """eps values strictly between consecutive distances, clear of the smaller one by a factor
  `gap` and of where DeepFool lands (at most 1.03 d + 2e-4), so the closed form is unambiguous."""
  d = np.sort(d[d > 0])
  eps = [np.sqrt(a * b) for a, b in zip(d[:-1], d[1:])
         if b / a > gap ** 2 and np.sqrt(a * b) > 1.03 * a + 2e-4]
  assert len(eps) >= count
  return [0.0] + [float(e) for e in eps[:count]]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_min_norm_curve_matches_closed_form(norm):
  logits_fn, x, y, clean_correct, distances = linear_problem(10)
  d = distances[norm]
  eps = eps_between(d[clean_correct])
  report = evaluate.evaluate(logits_fn, x, y, attack="deepfool", eps=eps, norm=norm,
                             batch_size=5, progress=False)
  expected = [float(np.mean(clean_correct & (d > e))) for e in eps]
  np.testing.assert_allclose(report["robust_accuracy"], expected)
  assert report["robust_accuracy"][0] == report["clean_accuracy"] == np.mean(clean_correct)
  result = report["attacks"]["deepfool"]
  assert result["success_rate"] == 1.0
  needed = np.array([np.nan if v is None else v for v in result["perturbation_norm"]])
  assert np.all(np.isnan(needed[~clean_correct]))  # misclassified points need no attack
  # DeepFool lands just past the boundary (overshoot 2%, plus foolbox's 1e-4 slack).
  assert np.all(needed[clean_correct] >= d[clean_correct])
  assert np.all(needed[clean_correct] <= 1.03 * d[clean_correct] + 2e-4)
  assert result["norms"][norm]["median"] == pytest.approx(np.median(needed[clean_correct]))


def test_eps_bounded_curve_matches_closed_form_and_counts_misclassified_as_not_robust():
  logits_fn, x, y, clean_correct, distances = linear_problem(2)
  d = distances["linf"]
  eps = eps_between(d[clean_correct], gap=1.02)
  report = evaluate.evaluate(logits_fn, x, y, attack="pgd", eps=eps, norm="linf", batch_size=5,
                             progress=False)
  expected = [float(np.mean(clean_correct & (d > e))) for e in eps]
  np.testing.assert_allclose(report["robust_accuracy"], expected)
  masks = np.asarray(report["still_robust"])
  assert not masks[:, ~clean_correct].any()


@pytest.mark.slow
def test_autoattack_matches_closed_form_with_consistent_breakdown():
  logits_fn, x, y, clean_correct, distances = linear_problem(10, seed=1)
  d = distances["linf"]
  eps = eps_between(d[clean_correct], count=1)[1:]
  report = evaluate.evaluate(logits_fn, x, y, attack="autoattack", eps=eps, norm="linf",
                             batch_size=8, progress=False)
  robust = clean_correct & (d > eps[0])
  np.testing.assert_array_equal(report["still_robust"][0], robust)
  result = report["attacks"]["autoattack"]
  broken_by = np.array(result["broken_by"][0], dtype=object)
  assert np.all(broken_by[~clean_correct] == "clean")
  assert np.all((broken_by == None) == robust)  # noqa: E711 (elementwise)
  after = result["robust_accuracy_after"][0]
  assert list(after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  assert after["square"] == report["robust_accuracy"][0]
  assert result["hyperparameters"]["attacks"]["square"]["n_queries"] == 5000


@pytest.mark.parametrize("version,attacks,sequence", [
    ("fast", (), ["apgd-ce", "apgd-t"]),
    ("rand", (), ["apgd-ce", "apgd-dlr"]),
    ("custom", ("apgd-dlr", "fab"), ["apgd-dlr", "fab"]),
])
@pytest.mark.slow
def test_autoattack_versions_run_their_sequence_and_say_so(version, attacks, sequence):
  logits_fn, x, y, clean_correct, distances = linear_problem(10, seed=1)
  d = distances["linf"]
  eps = eps_between(d[clean_correct], count=1)[1:]
  report = evaluate.evaluate(logits_fn, x, y, attack="autoattack", eps=eps, norm="linf",
                             batch_size=8, progress=False,
                             overrides={"version": version, "attacks": attacks})
  np.testing.assert_array_equal(report["still_robust"][0], clean_correct & (d > eps[0]))
  result = report["attacks"]["autoattack"]
  assert list(result["robust_accuracy_after"][0]) == ["clean", *sequence]
  seconds = result["stage_seconds"][0]
  assert list(seconds) == ["checks", *sequence] and all(t > 0 for t in seconds.values())
  compiling = result["stage_compile_seconds"][0]  # the compiling part of each stage's seconds
  assert list(compiling) == list(seconds)
  assert all(0 <= compiling[k] <= seconds[k] for k in seconds), (compiling, seconds)
  assert list(result["hyperparameters"]["attacks"]) == sequence
  assert version == "rand" or "not the standard" in result["label"]
  if version == "rand":
    assert result["hyperparameters"]["attacks"]["apgd-dlr"]["eot_iter"] == 20
  checks = {c["check"]: c["status"] for c in result["checks"][0]}
  assert checks["range_output"] == "ok" and checks["zero_gradients"] == "ok"
  assert ("randomized" in checks) == (version != "rand")


def test_autoattack_checks_warn_on_probabilities_and_zero_gradients():
  logits_fn, x, y, _, _ = linear_problem(10, seed=1)
  probabilities = lambda v: jax.nn.softmax(0.0 * logits_fn(v))  # constant, and sums to 1
  report = evaluate.evaluate(probabilities, x, y, attack="autoattack", eps=[0.05], norm="linf",
                             batch_size=8, progress=False, overrides={"version": "fast"})
  checks = {c["check"]: c for c in report["attacks"]["autoattack"]["checks"][0]}
  assert checks["range_output"]["status"] == "warn"
  assert checks["randomized"]["status"] == "ok"
  assert checks["dynamic"]["status"] == "not run"
  if "zero_gradients" in checks:  # only when some point is classified correctly
    assert checks["zero_gradients"]["status"] == "warn"
  with pytest.raises(ValueError, match="custom"):
    evaluate.evaluate(logits_fn, x, y, attack="autoattack", eps=[0.05], norm="linf",
                      progress=False, overrides={"version": "custom", "attacks": ("pgd",)})
  with pytest.raises(ValueError, match="unknown"):
    evaluate.evaluate(logits_fn, x, y, attack="autoattack", eps=[0.05], norm="linf",
                      progress=False, overrides={"version": "plus"})


def test_report_schema_subset_and_json():
  logits_fn, x, y, clean_correct, _ = linear_problem(10)
  subset = [0, 3, 4, 7]
  report = evaluate.evaluate(logits_fn, x, y, attack="fgsm", eps=[0.0, 0.05], norm="linf",
                             batch_size=5, seed=3, subset=subset, progress=False)
  for key in ("schema_version", "attack", "norm", "eps", "num_examples", "batch_size", "seed",
              "clean_accuracy", "robust_accuracy", "clean_correct", "still_robust", "attacks",
              "skipped", "subset", "elapsed_seconds"):
    assert key in report, key
  result = report["attacks"]["fgsm"]
  for key in ("kind", "source", "function", "hyperparameters", "robust_accuracy", "still_robust",
              "elapsed_seconds", "subset_robust_accuracy"):
    assert key in result, key
  assert result["hyperparameters"] == {"loss": "ce"}
  assert report["num_examples"] == N and len(report["still_robust"][0]) == N
  masks = np.asarray(report["still_robust"])
  np.testing.assert_allclose(report["robust_accuracy"], masks.mean(1))  # over all N
  np.testing.assert_allclose(report["subset"]["robust_accuracy"], masks[:, subset].mean(1))
  assert report["subset"]["clean_accuracy"] == np.mean(clean_correct[subset])
  json.dumps(report, allow_nan=False)


def test_all_runs_every_supporting_attack_and_reports_the_worst_case(monkeypatch):
  cheap = {"fgsm": evaluate.ATTACKS["fgsm"], "deepfool": evaluate.ATTACKS["deepfool"],
           "cw": evaluate.ATTACKS["cw"]}
  monkeypatch.setattr(evaluate, "ATTACKS", cheap)
  logits_fn, x, y, _, _ = linear_problem(10)
  report = evaluate.evaluate(logits_fn, x, y, attack="all", eps=[0.01, 0.03], norm="linf",
                             batch_size=6, progress=False)
  assert set(report["attacks"]) == {"fgsm", "deepfool"}
  assert "cw" in report["skipped"]
  worst = np.logical_and(report["attacks"]["fgsm"]["still_robust"],
                         report["attacks"]["deepfool"]["still_robust"])
  np.testing.assert_array_equal(report["still_robust"], worst)


def test_each_attack_compiles_once_per_batch_shape(monkeypatch):
  traced_once = chex.assert_max_traces(fgsm, n=1)
  spec = dataclasses.replace(evaluate.ATTACKS["fgsm"], fn=traced_once)
  monkeypatch.setitem(evaluate.ATTACKS, "fgsm", spec)
  logits_fn, x, y, _, _ = linear_problem(10)
  x5, y5 = x[:5], y[:5]
  # 3 eps x 3 batches of 2 (the last one padded): still one trace.
  evaluate.evaluate(logits_fn, x5, y5, attack="fgsm", eps=[0.0, 0.01, 0.02], batch_size=2,
                    progress=False)


def test_onepixel_reports_success_rate_over_correct_points():
  logits_fn, x, y, clean_correct, _ = linear_problem(10)
  report = evaluate.evaluate(logits_fn, x, y, attack="onepixel", eps=[0.0], batch_size=8,
                             progress=False,
                             overrides={"population": 8, "iterations": 2})
  result = report["attacks"]["onepixel"]
  assert result["threat_model"] == {"norm": "l0", "pixels": 1}
  chex.assert_shape(np.asarray(result["still_robust"]), (1, len(y)))  # one type: [n_eps, N]
  robust = np.asarray(result["still_robust"])[0]
  assert not robust[~clean_correct].any()
  assert report["still_robust"] == result["still_robust"]
  fooled = clean_correct & ~robust
  assert all((n is not None) == f for n, f in zip(result["perturbation_norm"], fooled))
  assert result["success_rate"] == pytest.approx(1 - robust.sum() / clean_correct.sum())


def test_onepixel_batches_fill_about_batch_size_images_per_call():
  assert evaluate.onepixel_batching(400, 500) == (1, 400)
  assert evaluate.onepixel_batching(400, 300) == (1, 200)
  assert evaluate.onepixel_batching(8, 100) == (12, 8)
  assert evaluate.onepixel_batching(400, 500, chunk_size=10) == (50, 10)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attack="nope"), "Unknown attack"),
    (dict(attack="pgd", eps=[-0.1]), ">= 0"),
    (dict(attack="pgd", eps=[2.0]), "<= 1"),
    (dict(attack="cw", norm="linf"), "does not support norm"),
    (dict(attack="pgd", norm="l0"), "Unknown norm"),
    (dict(attack="pgd", eps=[]), "empty"),
    (dict(attack="pgd", subset=[0, 99]), "subset indices"),
    (dict(attack="pgd", overrides={"stepz": 3}), "no hyper-parameter"),
    (dict(attack="pgd", batch_size=0), "batch_size"),
])
def test_bad_requests_raise_clear_errors(kwargs, message):
  logits_fn, x, y, _, _ = linear_problem(10)
  kwargs = {"eps": [0.01], "norm": "linf", "progress": False, **kwargs}
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate(logits_fn, x, y, **kwargs)


def test_images_outside_unit_box_and_bad_labels_raise():
  logits_fn, x, y, _, _ = linear_problem(10)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    evaluate.evaluate(logits_fn, x * 255, y, attack="fgsm", eps=[0.01], progress=False)
  with pytest.raises(ValueError, match="labels"):
    evaluate.evaluate(logits_fn, x, y[:3], attack="fgsm", eps=[0.01], progress=False)


def test_hyperparameters_lists_defaults_and_registry_settings():
  hp = evaluate.hyperparameters("pgd", "linf")
  assert hp["steps"] == 20 and hp["random_start"] is True and "key" not in hp
  assert evaluate.hyperparameters("square", "linf")["n_queries"] == 5000
  assert evaluate.hyperparameters("fab", "l2")["targeted"] is True
  assert set(evaluate.hyperparameters("deepfool", "l2")) >= {"steps", "overshoot"}


def _run_eval(*args, cwd, **extra_env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "GFA_DATA_DIR": "", **extra_env,
         "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eval_command_line_end_to_end(tmp_path):
  from configs import tiny
  from gfa_jax import data
  config = tiny.get_config()
  config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (8,)})
  model = models.from_config(config.model)
  params = models.init_params(model, jax.random.key(0), data.image_shape(config.data_source))
  checkpoints.export_params(tmp_path / "model.msgpack", config, params)
  (tmp_path / "subset.txt").write_text("# paper protocol\n0 2\n5\n")
  out = tmp_path / "out.json"
  proc = _run_eval("--workdir", str(tmp_path / "model.msgpack"), "--attack", "fgsm",
                   "--eps", "0,8/255", "--num_examples", "10", "--batch_size", "4",
                   "--output", str(out), "--plot", str(tmp_path / "curve.png"),
                   "--subset", str(tmp_path / "subset.txt"), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["eps"] == [0.0, 8 / 255] and report["eps_text"] == "0,8/255"
  assert report["num_examples"] == 10 and report["subset"]["indices"] == [0, 2, 5]
  assert {"checkpoint", "git_commit", "data"} <= set(report)
  assert (tmp_path / "curve.png").stat().st_size > 0

  missing = _run_eval("--workdir", str(tmp_path / "missing"), "--attack", "apgd", cwd=tmp_path)
  assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_eval_compilation_cache_is_written_then_reused(tmp_path):
  """--compilation_cache_dir: the first run stores its compiled programs, the second finds
  every one of them there (a hit writes nothing) and gives the same numbers."""
  from configs import tiny
  from gfa_jax import data
  config = tiny.get_config()
  config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (8,)})
  model = models.from_config(config.model)
  params = models.init_params(model, jax.random.key(0), data.image_shape(config.data_source))
  checkpoints.export_params(tmp_path / "model.msgpack", config, params)
  cache = tmp_path / "cache"
  reports = []
  for run in range(2):
    out = tmp_path / f"out{run}.json"
    # Threshold 0: the tiny model's programs compile in well under JAX's default 1 s.
    proc = _run_eval("--workdir", str(tmp_path / "model.msgpack"), "--attack", "apgd",
                     "--num_examples", "8", "--batch_size", "8", "--output", str(out),
                     "--compilation_cache_dir", str(cache), cwd=tmp_path,
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports.append(json.loads(out.read_text()))
    entries = sorted(p.name for p in cache.iterdir())
    if run == 0:
      first_entries = entries
      assert any("while" in e or "apgd" in e or "jit" in e for e in entries), entries
  assert entries == first_entries
  for key in ("robust_accuracy", "still_robust", "hyperparameters"):
    assert reports[0]["attacks"]["apgd"][key] == reports[1]["attacks"]["apgd"][key], key


def test_eval_alignment_reports_every_layer_for_both_splits(tmp_path):
  from configs import tiny
  from gfa_jax import data
  config = tiny.get_config()
  model = models.from_config(config.model)
  params = models.init_params(model, jax.random.key(0), data.image_shape(config.data_source))
  checkpoints.export_params(tmp_path / "model.msgpack", config, params)
  out = tmp_path / "alignment.json"
  proc = _run_eval("--workdir", str(tmp_path / "model.msgpack"), "--attack", "alignment",
                   "--num_examples", "20", "--batch_size", "10", "--output", str(out),
                   cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = json.loads(out.read_text())["alignment"]
  assert set(table) == {"train", "test"}
  assert set(table["test"]) == {"layer0", "layer1", "layer2", "layer3"}
  assert all(-1.0 <= v <= 1.0 for split in table.values() for v in split.values())
  assert "| train |" in proc.stdout


@pytest.mark.slow
def test_eval_mechanism_compares_two_models(tmp_path):
  from configs import tiny
  from gfa_jax import data
  config = tiny.get_config()
  model = models.from_config(config.model)
  shape = data.image_shape(config.data_source)
  for seed in (0, 1):
    params = models.init_params(model, jax.random.key(seed), shape)
    checkpoints.export_params(tmp_path / f"m{seed}.msgpack", config, params)
  proc = _run_eval("--workdir", str(tmp_path / "m0.msgpack"), "--compare",
                   str(tmp_path / "m1.msgpack"), "--attack", "mechanism", "--num_examples", "6",
                   "--batch_size", "6", "--output", str(tmp_path / "mech"), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "mech" / "mechanism.json").read_text())
  assert set(report["models"]) == {"m0", "m1"}
  assert report["checkpoint"]["path"].endswith("m0.msgpack")  # provenance beside the numbers
  assert set(report["models"]["m0"]["radial_tangential"]["layers"]) == {"layer0", "layer1", "layer2"}
  assert (tmp_path / "mech" / "landscape.png").stat().st_size > 0


def test_a_second_model_of_the_same_architecture_compiles_nothing_new():
  """Weights are traced (batching.bind), never baked into the compiled attack: evaluating another
  checkpoint of the same architecture reuses every compiled program."""
  from gfa_jax import batching
  from gfa_jax.attacks import core as attack_core
  config = {"name": "mlp", "hidden": (8,)}
  x = np.random.default_rng(0).uniform(size=(6, 32, 32, 3)).astype(np.float32)

  def run(seed):
    model = models.from_config(config)
    params = models.init_params(model, jax.random.key(seed), x.shape[1:])
    logits_fn = batching.bind(model.apply, {"params": params})
    y = batching.predict(logits_fn, x, 8)  # all correct: every point is attacked
    return evaluate.evaluate(logits_fn, x, y, attack="apgd", eps=[8 / 255], batch_size=8,
                             progress=False)

  assert run(0)["clean_accuracy"] == 1.0
  sizes = attack_core._attack_batch._cache_size(), batching._predict_batch._cache_size()
  report = run(1)
  assert (attack_core._attack_batch._cache_size(), batching._predict_batch._cache_size()) == sizes
  assert models.from_config(config) is models.from_config(dict(config))
  assert 0.0 <= report["robust_accuracy"][0] <= report["clean_accuracy"]


def test_nan_models_are_refused_and_collapsed_models_named():
  x = np.random.default_rng(0).uniform(size=(120, 4, 4, 1)).astype(np.float32)
  y = np.arange(120) % 10
  nan_model = lambda x: jnp.full((x.shape[0], 10), jnp.nan)
  with pytest.raises(ValueError, match="non-finite logits on 120 of the first 120"):
    evaluate.evaluate(nan_model, x, y, attack="fgsm", eps=[0.03], progress=False)
  constant = lambda x: jnp.zeros((x.shape[0], 10)).at[:, 3].set(1.0) + 0.0 * x.sum()
  report = evaluate.evaluate(constant, x, y, attack="fgsm", eps=[0.03], progress=False)
  assert report["degenerate"].startswith("collapsed: predicts class 3 for 100 % of inputs")
  assert evaluate.degenerate_model(y, y, 10) is None


def test_autoattack_skips_a_model_whose_logits_do_not_depend_on_the_input():
  logits_fn, x, y, _, _ = linear_problem(10, seed=1)
  bias = jnp.arange(10.0)[::-1]  # always class 0, whatever the input
  constant = lambda v: jnp.zeros((v.shape[0], 10)) * jnp.sum(v) + bias
  report = evaluate.evaluate(constant, x, y, attack="autoattack", eps=[0.05], norm="linf",
                             batch_size=8, progress=False)
  result = report["attacks"]["autoattack"]
  checks = {c["check"]: c["status"] for c in result["checks"][0]}
  assert checks["input_independent"] == "warn" and checks["zero_gradients"] == "warn"
  assert set(result["skipped_stages"][0]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
  assert report["robust_accuracy"][0] == report["clean_accuracy"] == np.mean(y == 0) > 0
  # A model that depends on its input, however weakly, is attacked as usual.
  weak = lambda v: constant(v) + 1e-3 * logits_fn(v)
  report = evaluate.evaluate(weak, x, y, attack="autoattack", eps=[0.05], norm="linf",
                             batch_size=8, progress=False, overrides={"version": "fast"})
  result = report["attacks"]["autoattack"]
  assert result["skipped_stages"][0] == {}
  assert {c["check"]: c["status"] for c in result["checks"][0]}["input_independent"] == "ok"
  assert [c["status"] for c in report["model_checks"]] == ["ok", "ok"]
  assert "not_run" not in result


def test_no_attack_runs_on_a_model_whose_logits_do_not_depend_on_the_input(monkeypatch):
  from gfa_jax.attacks import core as attack_core
  _, x, y, _, _ = linear_problem(10, seed=1)
  bias = jnp.arange(10.0)[::-1]  # always class 0, whatever the input
  constant = lambda v: jnp.zeros((v.shape[0], 10)) * jnp.sum(v) + bias

  def refuse(*args, **kwargs):
    raise AssertionError("an attack ran on an input-independent model")

  with monkeypatch.context() as patch:
    patch.setattr(attack_core, "run_in_batches", refuse)
    report = evaluate.evaluate(constant, x, y, attack="all", eps=[0.05], norm="linf",
                               batch_size=8, progress=False)
  assert {c["check"]: c["status"] for c in report["model_checks"]} == {
      "zero_gradients": "warn", "input_independent": "warn"}
  clean = report["clean_accuracy"]
  assert clean == np.mean(y == 0) > 0
  for name, result in report["attacks"].items():
    assert result["robust_accuracy"] == [clean], name
    if name == "autoattack":
      assert set(result["skipped_stages"][0]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    else:
      assert "do not depend on the input" in result["not_run"], name
  assert "NOT RUN" in reporting.attack_summary(report)
  # skip_if_constant=False attacks anyway (and the attack leaves the same robust accuracy).
  forced = evaluate.evaluate(constant, x, y, attack="pgd", eps=[0.05], batch_size=8,
                             progress=False, skip_if_constant=False)
  assert "not_run" not in forced["attacks"]["pgd"]
  assert forced["robust_accuracy"] == [clean]

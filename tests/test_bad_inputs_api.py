"""Bad input through the library API (issue 36): one ValueError with a clear message, never a
traceback from deep inside, a NaN, or a silently wrong number. In-process, on a linear model
of 4x4x3 images and an MLP of the same size, so each case costs milliseconds."""

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import checkpoints, evaluate, models, objectives, run_files
from gfa_jax.attacks.apgd import apgd
from gfa_jax.attacks.autoattack import autoattack
from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.attacks.pgd import pgd
from gfa_jax.penalty import gfa_objective, gfa_penalty

SHAPE = (4, 4, 3)
K = 3
W = np.asarray(jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), K)))
X = np.asarray(jax.random.uniform(jax.random.key(1), (6, *SHAPE), minval=0.2, maxval=0.8))
Y = np.array([0, 1, 2, 0, 1, 2], np.int32)
KEY = jax.random.key(0)


def logits_fn(x):
  return (x.reshape(x.shape[0], -1) - 0.5) @ W


def mlp():
  model = models.create_model("mlp", hidden=(8,), num_classes=K)
  return model, models.init_params(model, jax.random.key(2), SHAPE)


BAD_LABELS = {"above the classes": np.array([0, 1, 2, 3, 1, 2]),
              "negative": np.array([0, 1, 2, -1, 1, 2]),
              "fractional": np.array([0.0, 1.5, 2.0, 0.0, 1.0, 2.0], np.float32)}


@pytest.mark.parametrize("labels", sorted(BAD_LABELS))
@pytest.mark.parametrize("caller", ["fgsm", "apgd", "evaluate", "gfa_objective"])
def test_labels_outside_the_classes_are_refused(caller, labels):
  y = BAD_LABELS[labels]
  calls = {
      "fgsm": lambda: fgsm(logits_fn, X, y, eps=0.1),
      "apgd": lambda: apgd(logits_fn, X, y, key=KEY, eps=0.1, steps=2),
      "evaluate": lambda: evaluate.evaluate(logits_fn, X, y, attack="fgsm", eps=[0.1],
                                            progress=False),
      "gfa_objective": lambda: gfa_objective(*mlp_apply(), X, y, objectives.cross_entropy,
                                             layers=("layer0",)),
  }
  with pytest.raises(ValueError, match="labels must"):
    calls[caller]()


def mlp_apply():
  model, params = mlp()
  return model.apply, params


def test_good_labels_still_pass_everywhere():
  # The same calls with valid labels run: the checks refuse only what is wrong.
  assert fgsm(logits_fn, X, Y, eps=0.1).shape == X.shape
  objective, _ = gfa_objective(*mlp_apply(), X, Y, objectives.cross_entropy,
                               layers=("layer0",))
  assert np.isfinite(float(objective))


@pytest.mark.parametrize("images", ["uint8", "0-255", "nan", "inf"])
def test_gfa_objective_checks_images_like_the_attacks(images):
  x = {"uint8": (X * 255).astype(np.uint8), "0-255": X * 255,
       "nan": np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X),
       "inf": np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X)}[images]
  with pytest.raises(ValueError, match="Images must"):
    gfa_objective(*mlp_apply(), x, Y, objectives.cross_entropy, layers=("layer0",))
  with pytest.raises(ValueError, match="Images must"):
    fgsm(logits_fn, x, Y, eps=0.1)


def test_gfa_objective_without_layers_and_gfa_penalty_eps_list():
  with pytest.raises(ValueError, match="at least one tapped layer"):
    gfa_objective(*mlp_apply(), X, Y, objectives.cross_entropy, layers=())
  taps = {"a": jnp.zeros((2, 3))}
  loss_fn = lambda t: (jnp.sum(t["a"]), t)
  with pytest.raises(ValueError, match="eps must be > 0, one number"):
    gfa_penalty(loss_fn, taps, eps=[1e-12])


@pytest.mark.parametrize("case", ["fgsm eps list", "autoattack eps list", "evaluate eps number",
                                  "evaluate zero examples", "fgsm eps text"])
def test_eps_of_the_wrong_kind_and_zero_examples(case):
  calls = {
      "fgsm eps list": lambda: fgsm(logits_fn, X, Y, eps=[0.1, 0.2]),
      "fgsm eps text": lambda: fgsm(logits_fn, X, Y, eps="8/255"),
      "autoattack eps list": lambda: autoattack(logits_fn, X, Y, key=KEY, eps=[0.1],
                                                version="fast"),
      "evaluate eps number": lambda: evaluate.evaluate(logits_fn, X, Y, attack="fgsm", eps=0.1),
      "evaluate zero examples": lambda: evaluate.evaluate(logits_fn, X[:0], Y[:0],
                                                          attack="fgsm", eps=[0.1]),
  }
  with pytest.raises(ValueError, match="eps must|no examples"):
    calls[case]()


@pytest.mark.parametrize("outputs", ["one logit", "rank 1", "rank 3"])
def test_models_that_are_not_classifiers_are_refused(outputs):
  fn = {"one logit": lambda x: logits_fn(x)[:, :1], "rank 1": lambda x: logits_fn(x)[:, 0],
        "rank 3": lambda x: logits_fn(x)[:, :, None]}[outputs]
  with pytest.raises(ValueError, match="logit"):
    evaluate.evaluate(fn, X, Y * 0, attack="fgsm", eps=[0.1], progress=False)
  if outputs == "one logit":
    with pytest.raises(ValueError, match="logit"):
      autoattack(fn, X, Y * 0, key=KEY, eps=0.1, version="fast")


def test_evaluate_warns_once_and_records_probabilities(caplog):
  probabilities = lambda x: jax.nn.softmax(logits_fn(x))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The warning goes to the log and the report, not here.
    report = evaluate.evaluate(probabilities, X, Y, attack="fgsm", eps=[0.05], progress=False)
  checks = {c["check"]: c for c in report["model_checks"]}
  assert checks["range_output"]["status"] == "warn"
  assert sum("probabilities" in r.getMessage() for r in caplog.records) == 1
  plain = evaluate.evaluate(logits_fn, X, Y, attack="fgsm", eps=[0.05], progress=False)
  assert "range_output" not in {c["check"] for c in plain["model_checks"]}


def test_images_that_are_not_arrays_are_refused():
  with pytest.raises(ValueError, match="Images must be a 4-D NHWC array.*list"):
    fgsm(logits_fn, X.tolist(), Y, eps=0.1)


def test_a_result_location_that_cannot_take_the_result_is_found_first(tmp_path, monkeypatch):
  # eval.py runs this before the attack: an hours-long AutoAttack's JSON must not be lost.
  (tmp_path / "file").write_text("x")
  with pytest.raises(OSError, match="cannot write the result"):
    run_files.check_writable(tmp_path / "file" / "out.json")
  with pytest.raises(ValueError, match="is a folder"):
    run_files.check_writable(tmp_path)
  run_files.check_writable(tmp_path / "new" / "deeper" / "out.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # The probe left nothing.
  full = shutil.disk_usage(tmp_path)._replace(free=4096)
  monkeypatch.setattr(run_files.shutil, "disk_usage", lambda path: full)
  with pytest.raises(OSError, match="only 4 KiB free"):
    run_files.check_writable(tmp_path / "out.json")


@pytest.mark.parametrize("text", ['{"model": ', "[1, 2]"])
def test_a_hand_edited_config_json_is_one_error(tmp_path, text):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match="config.json (is not valid JSON|holds a list)"):
    checkpoints.load_run_config(tmp_path)


@pytest.mark.parametrize("case", ["pgd steps 2.5", "evaluate seed as text", "channels first"])
def test_more_arguments_of_the_wrong_kind_are_one_error(case):
  # From the round of hostile inputs in docs/hostile_inputs.md: each was a TypeError from
  # inside JAX, or (channels first) silently accepted by a model that flattens its input.
  calls = {
      "pgd steps 2.5": lambda: pgd(logits_fn, X, Y, key=KEY, eps=0.1, steps=2.5),
      "evaluate seed as text": lambda: evaluate.evaluate(logits_fn, X, Y, attack="fgsm",
                                                         eps=[0.1], seed="abc"),
      "channels first": lambda: fgsm(logits_fn, np.zeros((2, 3, 8, 8), np.float32),
                                     Y[:2], eps=0.1),
  }
  with pytest.raises(ValueError, match="integer|channels-first"):
    calls[case]()

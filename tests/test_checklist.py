"""gfa_jax.checklist on tiny models whose verdicts are known: a healthy linear model passes every
check, masked models (quantised input, saturated softmax, sign-flipped gradient, randomness) fail
the checks that exist to catch them. The grading rules are also tested on hand-made masks."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import checklist
from gfa_jax.checklist import FAIL, PASS, WARN

SHAPE = (4, 4, 3)
NUM_CLASSES = 5  # >= 4, so targeted DLR runs
N = 32
EPS = 0.05
W = np.asarray(jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), NUM_CLASSES)))


def linear(variables, x):
  return (x.reshape(x.shape[0], -1) - 0.5) @ variables["w"]


def quantised(variables, x):
  """Rounds the input to 5 grey levels first: exactly zero gradient, unchanged geometry."""
  return linear(variables, jnp.round(x * 4) / 4)


def saturated(variables, x):
  """Logits 5 * softmax(1e4 * z): the softmax is (numerically) one-hot, gradients vanish."""
  return 5.0 * jax.nn.softmax(1e4 * linear(variables, x))


def sign_flipped(variables, x):
  """Sees 1 - x but back-propagates as if it saw x: every gradient points the wrong way."""
  return linear(variables, x + jax.lax.stop_gradient(1.0 - 2.0 * x))


def data(n=N):
  x = np.asarray(jax.random.uniform(jax.random.key(1), (n, *SHAPE)))
  y = np.asarray(linear({"w": W}, x)).argmax(1).astype(np.int32)  # clean accuracy 100%
  return x, y


def run(apply_fn, tmp_path, **kwargs):
  x, y = data()
  return checklist.run_checklist(apply_fn, {"w": W}, x, y, key=jax.random.key(2), eps=EPS,
                                 out_dir=tmp_path, budget="quick", batch_size=16, **kwargs)


def statuses(report):
  return {c["id"]: c["status"] for c in report["checks"]}


@pytest.mark.slow
def test_healthy_linear_model_passes_every_check(tmp_path):
  surrogate_w = W + 0.3 * np.asarray(jax.random.normal(jax.random.key(3), W.shape))
  report = run(linear, tmp_path, surrogate=(linear, {"w": surrogate_w}))
  assert statuses(report) == {i: PASS for i in range(1, 9)}, [c["verdict"] for c in
                                                              report["checks"]]
  # The headline is the per-example worst case over every run, so no run reports less.
  assert report["robust_accuracy"] <= min(report["attacks"].values())
  assert report["robust_accuracy"] == np.mean(report["still_robust"])
  assert 0 < report["robust_accuracy"] < report["clean_accuracy"] == 1.0
  written = json.loads((tmp_path / "checklist.json").read_text())
  assert [c["status"] for c in written["checks"]] == [PASS] * 8
  markdown = (tmp_path / "checklist.md").read_text()
  assert markdown.count("PASS") >= 8 and "eps_sweep.png" in markdown
  for name in ("eps_sweep.png", "convergence.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  sweep = report["checks"][0]["numbers"]
  assert sweep["eps"][-1] == 0.5 and sweep["worst_case"][-1] == 0.0


@pytest.mark.slow
def test_quantised_model_fails_black_box_and_gradient_checks(tmp_path):
  report = run(quantised, tmp_path, surrogate=(linear, {"w": W}))
  result = statuses(report)
  assert result[3] == FAIL and result[6] == FAIL, [c["verdict"] for c in report["checks"]]
  assert result[8] == PASS  # rounding is deterministic
  black_box = report["checks"][2]["numbers"]
  transfer = next(v for k, v in black_box.items() if k.startswith("transfer"))
  assert transfer["only_points"] > 0
  assert report["robust_accuracy"] <= transfer["robust_accuracy"]
  assert report["checks"][5]["numbers"]["margin"]["zero_fraction"] == 1.0


def test_missing_surrogate_is_a_warning_not_a_pass():
  robust = np.array([True, False, True, False])
  check = checklist.check_black_box(robust, {"square": robust.copy(), "transfer": None},
                                    tolerance=0.01)
  assert check["status"] == WARN and "not run" in check["verdict"]
  assert check["numbers"]["transfer"] is None


@pytest.mark.parametrize("model, failing", [(saturated, "zero"), (quantised, "zero"),
                                            (sign_flipped, "finite difference")])
def test_masked_gradients_fail_check_6(model, failing):
  x, y = data()
  check = checklist.check_gradients(functools.partial(model, {"w": W}), x, y,
                                    key=jax.random.key(0), eps=EPS, directions=4)
  numbers = check["numbers"]
  assert check["status"] == FAIL, check["verdict"]
  if failing == "zero":
    assert numbers["margin"]["zero_fraction"] > 0.5
  else:  # gradients exist but are wrong: only the finite differences can tell
    assert numbers["margin"]["zero_fraction"] == 0.0
    assert numbers["finite_difference"]["disagree_fraction"] == 1.0
    assert numbers["finite_difference"]["median_relative_error"] == pytest.approx(2.0, abs=0.01)


def test_healthy_gradients_pass_check_6():
  x, y = data()
  check = checklist.check_gradients(functools.partial(linear, {"w": W}), x, y,
                                    key=jax.random.key(0), eps=EPS, directions=4)
  assert check["status"] == PASS
  assert check["numbers"]["finite_difference"]["max_relative_error"] < 1e-2


def test_determinism_check():
  x, _ = data()
  rng = np.random.default_rng(0)
  noisy = lambda v, x: linear(v, x) + rng.normal(size=(x.shape[0], NUM_CLASSES))
  batch_norm = lambda v, x: linear(v, x - x.mean(axis=0))  # statistics of the batch
  assert checklist.check_determinism(linear, {"w": W}, x)["status"] == PASS
  assert checklist.check_determinism(noisy, {"w": W}, x)["status"] == FAIL
  assert checklist.check_determinism(batch_norm, {"w": W}, x)["status"] == WARN


def test_fgsm_stronger_than_iterative_fails_check_2():
  fgsm = np.zeros((2, 100), bool)  # FGSM breaks every point at both eps

  def status(left_robust):  # PGD leaves `left_robust` of the 100 points at the larger eps
    pgd = np.zeros((2, 100), bool)
    pgd[1, :left_robust] = True
    return checklist.check_fgsm([0.1, 0.2], fgsm, {"pgd": pgd}, tolerance=0.01)["status"]

  assert [status(k) for k in (0, 1, 2, 10)] == [PASS, PASS, WARN, FAIL]


def test_eps_sweep_grading():
  eps = [0.01, 0.1, 0.5]
  falling = np.array([[True] * 50 + [False] * 50, [True] * 10 + [False] * 90, [False] * 100])
  kwargs = dict(clean_accuracy=1.0, chance=0.1, grey_bound=0.1, tolerance=0.01)
  assert checklist.check_eps_sweep(eps, {"a": falling}, **kwargs)["status"] == PASS
  at_chance = falling.copy()
  at_chance[2, :10] = True
  assert checklist.check_eps_sweep(eps, {"a": at_chance}, **kwargs)["status"] == WARN
  stuck = falling.copy()
  stuck[2, :40] = True
  assert checklist.check_eps_sweep(eps, {"a": stuck}, **kwargs)["status"] == FAIL
  non_monotone = falling.copy()
  non_monotone[1, 50:60] = True  # robust at 0.1 after being broken at 0.01
  check = checklist.check_eps_sweep(eps, {"a": non_monotone}, **kwargs)
  assert check["status"] == WARN and check["numbers"]["non_monotone_points"] == 10
  # The worst case over attacks is per point: two attacks that each leave different points
  # robust leave none together.
  half = np.array([[True] * 50 + [False] * 50] * 3)
  check = checklist.check_eps_sweep(eps, {"a": half, "b": ~half}, **kwargs)
  assert check["numbers"]["worst_case"] == [0.0, 0.0, 0.0]


def test_convergence_and_loss_grading_count_points_not_averages():
  before = np.array([True] * 20 + [False] * 80)
  swapped = np.roll(before, 10)  # same robust accuracy, 10 different points broken
  check = checklist.check_convergence([10, 100], [before, swapped], before, restarts=2,
                                      restart_steps=10, tolerance=0.01)
  assert check["status"] == FAIL and check["numbers"]["newly_broken"] == [0.1]
  check = checklist.check_convergence([10, 100], [before, before], before, restarts=2,
                                      restart_steps=10, tolerance=0.01)
  assert check["status"] == PASS
  check = checklist.check_losses(before, {"dlr": swapped, "targeted-dlr": None},
                                 skipped={"targeted-dlr": "needs >= 4 classes"}, tolerance=0.01)
  assert check["status"] == FAIL and check["numbers"]["gain_over_ce"] == 0.1
  assert "skipped" in check["verdict"]
  # 5 of 30 CE-robust points broken: beyond 3 tolerances but a small share, as for TRADES.
  ce = np.array([True] * 30 + [False] * 70)
  targeted = ce.copy()
  targeted[:5] = False
  check = checklist.check_losses(ce, {"targeted-dlr": targeted}, skipped={}, tolerance=0.01)
  assert check["status"] == WARN
  assert check["numbers"]["broken_share_of_ce_robust"] == pytest.approx(5 / 30)


def test_eps_sweep_values():
  sweep = checklist.eps_sweep(8 / 255, "linf", SHAPE)
  np.testing.assert_allclose(sweep, [k / 255 for k in (1, 2, 4, 8, 16, 32, 64)] + [0.5])
  sweep = checklist.eps_sweep(0.5, "l2", (32, 32, 3))
  assert sweep[:4] == [0.0625, 0.125, 0.25, 0.5]
  assert sweep[-1] == pytest.approx(np.sqrt(3072) / 2) and sweep[-2] < sweep[-1]
  assert [checklist.eps_text(e) for e in (8 / 255, 0.5, 0.1)] == ["8/255", "0.5", "0.1"]


def test_bad_inputs_are_clear_errors(tmp_path):
  x, y = data(4)
  with pytest.raises(ValueError, match="unknown budget"):
    checklist.run_checklist(linear, {"w": W}, x, y, key=jax.random.key(0),
                            out_dir=tmp_path, budget="fast")
  with pytest.raises(ValueError, match="none of the examples"):
    checklist.run_checklist(linear, {"w": W}, x, (y + 1) % NUM_CLASSES,
                            key=jax.random.key(0), out_dir=tmp_path, budget="quick")

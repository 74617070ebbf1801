"""scripts/results_tables.py: the paper's subset protocol and Table 2 from result JSONs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_tables.py"


@pytest.fixture
def tables(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "RESULTS", tmp_path)
  return module


CURVE_EPS = [e / 255 for e in (1, 2, 4, 8, 16)]


def write(results: Path, model: str, name: str, attack: str, correct, robust, num_eps=1, eps=None,
          **extra):
  """A result JSON with the fields the tables read; the same robust mask at every eps (8/255
  for one eps, the 1..16/255 curve for five, unless `eps` says otherwise)."""
  eps = eps or ([8 / 255] if num_eps == 1 else CURVE_EPS)
  report = {"clean_accuracy": float(np.mean(correct)), "num_examples": len(correct),
            "clean_correct": list(correct), "eps": eps,
            "attacks": {attack: {"robust_accuracy": [float(np.mean(robust))] * num_eps,
                                 "still_robust": [list(robust)] * num_eps, **extra}}}
  (results / model / "eval").mkdir(parents=True, exist_ok=True)
  (results / model / "eval" / f"{name}.json").write_text(json.dumps(report))


def test_common_subset_leaves_out_collapsed_models(tables, tmp_path):
  write(tmp_path, "a", "pgd", "pgd", [1, 1, 1, 0, 1], [0, 1, 0, 0, 0])
  write(tmp_path, "b", "pgd", "pgd", [1, 0, 1, 1, 1], [1, 0, 0, 0, 1])  # 80 %, 40 % robust.
  write(tmp_path, "c", "pgd", "pgd", [0, 0, 0, 0, 0], [0] * 5)  # Collapsed: 0 % clean.
  np.testing.assert_array_equal(tables.common_subset(["a", "b", "c"]), [0, 2, 4])
  assert tables.robust(tables.load("b", "pgd"), 0, np.array([0, 2, 4])) == pytest.approx(2 / 3)


def test_table_robust_reports_autoattack_stages_and_own_subset(tables, tmp_path):
  correct, robust = [1, 1, 1, 1, 0], [1, 0, 1, 0, 0]
  for name in ("fgsm", "pgd"):
    write(tmp_path, "m", name, name, correct, robust, num_eps=5)  # The 1..16/255 curve.
  stages = [{"clean": 0.8, "apgd-ce": 0.6, "apgd-t": 0.5, "fab-t": 0.4, "square": 0.4}]
  write(tmp_path, "m", "autoattack", "autoattack", correct, robust, robust_accuracy_after=stages)
  rows = tables.table_robust([("m", "model m")], np.array([0, 1]))
  cells = [c.strip() for c in rows[2].split("|")[1:-1]]
  assert cells[:9] == ["model m", "80.0", "40.0", "40.0", "60.0", "50.0", "40.0", "40.0", "-"]
  assert cells[9] == "50.0 / 50.0"  # Examples 0 and 1: one of two survives.
  assert cells[10] == "50.0"  # 40 % robust of 80 % clean.


def test_eps_curve_table_has_a_row_per_attack_that_ran(tables, tmp_path):
  correct = [1, 1, 1, 1, 0]
  write(tmp_path, "m", "pgd", "pgd", correct, [1, 0, 1, 0, 0], num_eps=5)
  write(tmp_path, "m", "apgd_curve", "apgd", correct, [1, 0, 0, 0, 0], num_eps=5)
  rows = tables.table_eps_curve([("m", "model m")], ["FGSM", "PGD-20", "APGD-CE"])
  assert rows[2:] == ["| model m | PGD-20 | 5 | 40.0 | 40.0 | 40.0 | 40.0 | 40.0 |",
                      "| model m | APGD-CE | 5 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 |"]  # No FGSM.


def test_autoattack_curve_takes_8_255_from_the_main_run_on_its_first_images(tables, tmp_path):
  stages = {"clean": 0, "apgd-ce": 0, "apgd-t": 0, "fab-t": 0, "square": 0}  # Only keys read.
  # The 8/255 run on 6 images: example 1 falls to APGD-T, 2 to Square, 3 survives; 4, 5 (past
  # the curve's 4 images) survive too and must not count.
  write(tmp_path, "m", "autoattack", "autoattack", [1] * 6, [0, 0, 0, 1, 1, 1],
        robust_accuracy_after=[stages],
        broken_by=[["apgd-ce", "apgd-t", "square", None, None, None]])
  curve_eps = [e / 255 for e in (1, 2, 4, 16)]
  write(tmp_path, "m", "autoattack_curve", "autoattack", [1] * 4, [1, 1, 1, 1], eps=curve_eps,
        robust_accuracy_after=[stages] * 4, broken_by=[[None] * 4] * 3 + [["clean"] * 4])
  rows = tables.table_eps_curve([("m", "model m")], ["APGD-CE + APGD-T", "AutoAttack"])
  assert rows[2:] == [
      "| model m | APGD-CE + APGD-T | 4 | 100.0 | 100.0 | 100.0 | 50.0 | 0.0 |",
      "| model m | AutoAttack | 4 | 100.0 | 100.0 | 100.0 | 25.0 | 0.0 |"]


def test_eps_curve_table_restricts_longer_runs_to_the_first_n_images(tables, tmp_path):
  write(tmp_path, "m", "apgd_curve", "apgd", [1] * 4, [1, 1, 0, 0], num_eps=5)
  rows = tables.table_eps_curve([("m", "model m")], ["APGD-CE"], n=2)
  assert rows[2:] == ["| model m | APGD-CE | 2 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |"]
  assert tables.table_eps_curve([("m", "model m")], ["APGD-CE"], n=8)[2:] == []  # Too few.


def test_sweep_table_shows_deeper_taps_and_diverged_runs(tables, tmp_path):
  final = {f"{split}/{key}": value for split in ("train", "test") for key, value in
           [("accuracy", 0.5), *((f"alignment/layer{i}", i / 10) for i in range(4))]}
  records = [{"name": "l123", "overrides": {"beta": 1.0, "gfa_layers": ["layer1", "layer2",
                                                                       "layer3"]},
              "final_eval": final, "apgd_robust_accuracy": 0.25, "apgd_clean_accuracy": 0.5},
             {"name": "nan", "overrides": {"beta": 0.3}, "diverged": "non-finite loss"}]
  (tmp_path / "sweep").mkdir()
  (tmp_path / "sweep" / "sweep.jsonl").write_text("\n".join(map(json.dumps, records)))
  rows = tables.table_sweep("sweep")
  assert rows[2].split(" | ")[3:5] == ["0.00 / 0.10 / 0.20 / 0.30"] * 2  # L0-L2 + tapped L3.
  assert rows[2].endswith("| 25.0 (50.0) |")
  assert "diverged: non-finite loss" in rows[3]

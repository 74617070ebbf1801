"""scripts/beta_sweep.py: which variants a sweep trains."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "beta_sweep.py"


@pytest.fixture(scope="module")
def sweep():
  spec = importlib.util.spec_from_file_location("beta_sweep", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_default_runs_every_variant_but_those_on_request(sweep):
  names = [name for name, _ in sweep.variants_to_run(set(), done=set())]
  assert names == [name for name, _ in sweep.VARIANTS]
  assert not {name for name, _ in sweep.ON_REQUEST} & set(names)


def test_only_selects_on_request_variants_and_skips_done_ones(sweep):
  pending = sweep.variants_to_run({"standard", "deep_mse_b0.1", "deep_l123_mse_b0.1"},
                                  done={"standard"})
  assert [name for name, _ in pending] == ["deep_mse_b0.1", "deep_l123_mse_b0.1"]
  assert pending[1][1] == {"beta": 0.1, "gfa_layers": ("layer1", "layer2", "layer3")}


def test_unknown_variant_names_the_lists(sweep):
  with pytest.raises(SystemExit, match="unknown variants .'deep_b9'.*ON_REQUEST"):
    sweep.variants_to_run({"deep_b9"}, done=set())

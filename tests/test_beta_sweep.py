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
  with pytest.raises(SystemExit, match="unknown variants .'deep_b9'. in group round1.*ON_REQUEST"):
    sweep.variants_to_run({"deep_b9"}, done=set())


def test_round2_covers_each_reading_with_five_betas_and_builds_valid_configs(sweep):
  import argparse
  args = argparse.Namespace(model="small_cnn", data_dir="", num_train=64, epochs=1, num_eval=64,
                            warmup_epochs=0.0)
  pending = sweep.variants_to_run(set(), done=set(), group="round2")
  assert len({name for name, _ in pending}) == len(pending) == len(sweep.ROUND2)
  for family in ("deep_mse_detached", "deep_mse_anti", "mlp_deep_mse", "sgd_deep_mse"):
    assert sum(name.rsplit("_b", 1)[0] == family for name, _ in pending) >= 5, family
  configs = {name: sweep.variant_config(overrides, args) for name, overrides in pending}
  assert configs["mlp_deep_mse_b0.1"].model.name == "mlp"
  assert configs["deep_mse_detached_b1.0"].gfa_gradient == "detached"
  assert configs["deep_mse_anti_b0.1"].gfa_direction == "anti"
  assert configs["sgd_deep_mse_b0.1"].optimizer == "sgd"
  assert configs["sgd_deep_mse_b0.1"].weight_decay == 5e-4
  assert "model" not in dict(pending)["mlp_standard"] or configs["mlp_standard"].model.name == "mlp"

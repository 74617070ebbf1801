"""scripts/scrub_paths.py: committed artefacts carry no machine path (issue 16)."""

import importlib.util
import json
from pathlib import Path

import flax.serialization
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scrub_paths", ROOT / "scripts" / "scrub_paths.py")
scrub_paths = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scrub_paths)


def test_json_and_checkpoints_lose_their_paths_and_keep_their_numbers(tmp_path):
  report = {"data": "CIFAR-10 (official binary layout, /work/data/cifar-10-batches-bin)",
            "checkpoint": {"path": "/tmp/run/params.msgpack"}, "data_dir": "/root/d", "x": 0.25}
  (tmp_path / "r.json").write_text(json.dumps(report))
  params = {"w": np.arange(6, dtype=np.float32)}
  payload = {"config": json.dumps({"data_dir": "/work/data", "model": {"name": "mlp"}}),
             "metadata": json.dumps({"command": "train.py --workdir /home/me/run"}),
             "params": params}
  (tmp_path / "p.msgpack").write_bytes(flax.serialization.msgpack_serialize(payload))
  assert all(scrub_paths.scrub_file(p) for p in (tmp_path / "r.json", tmp_path / "p.msgpack"))
  clean = json.loads((tmp_path / "r.json").read_text())
  assert clean == {"data": "CIFAR-10 (official binary layout, cifar-10-batches-bin)",
                   "checkpoint": {"path": "params.msgpack"}, "data_dir": "", "x": 0.25}
  restored = flax.serialization.msgpack_restore((tmp_path / "p.msgpack").read_bytes())
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  assert json.loads(restored["config"])["data_dir"] == ""
  assert "/home/" not in restored["metadata"]
  assert not scrub_paths.scrub_file(tmp_path / "r.json")  # nothing left to change


def test_committed_results_hold_no_machine_path():
  dirty = [p for p in scrub_paths.files([ROOT / "results"])
           if scrub_paths.PATH.search(p.read_bytes().decode("latin-1"))]
  assert not dirty, f"run python scripts/scrub_paths.py; paths in {dirty[:5]}"

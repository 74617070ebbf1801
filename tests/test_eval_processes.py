"""Two evaluation processes on 127.0.0.1 split the attack batches over one progress folder and
return the masks of one process (issue 34, part 2), for APGD-CE and the standard AutoAttack
(cheap settings, tests/test_resume_eval.py)."""

import json

import numpy as np
import pytest

from tests import test_resume_eval as resume
from tests.test_distributed import free_port

# The slow set (make test-slow; CI runs it too): several processes.
pytestmark = pytest.mark.slow

ATTACKS = ("apgd", "autoattack")


def test_two_processes_split_the_batches_and_give_the_result_of_one(tmp_path):
  # One process first: its compiled programs (in the tests' shared cache) serve the two.
  one = resume.start(",".join(ATTACKS), tmp_path / "one", tmp_path / "one.json")
  _, err = one.communicate(timeout=300)
  assert one.returncode == 0, err[-2000:]
  references = json.loads((tmp_path / "one.json").read_text())
  folder, out, port = tmp_path / "progress", tmp_path / "out.json", free_port()
  procs = [resume.start(",".join(ATTACKS), folder, out, JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
           for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
  reports = json.loads(out.read_text())
  for attack in ATTACKS:
    assert (resume.without_timings(reports[attack])
            == resume.without_timings(references[attack])), attack
    # Batch i of every call was computed by process i % 2, and both had batches to compute.
    writers = {}
    for path in (folder / attack).glob("*.npz"):
      with np.load(path) as unit:
        writers[path.name] = int(unit["process"])
    assert set(writers.values()) == {0, 1}, attack
    assert all(process == int(name.split(".b")[-1][:6]) % 2 for name, process in writers.items())

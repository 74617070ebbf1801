"""docs/your_model.md runs as written: its Python blocks in order, then its eval.py command on a
random checkpoint of the architecture it names."""

import ast
import builtins
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "your_model.md"


SLOW = "<!-- not executed by tests/test_docs_your_model.py"


def blocks(language: str, slow: bool = False) -> list[str]:
  """The document's fenced blocks of `language`; those under a SLOW comment only with `slow`."""
  found = re.findall(rf"^(<!-- .*?-->\n)?```{language}\n(.*?)^```", DOC.read_text(),
                     re.S | re.M)
  return [code for comment, code in found if comment.startswith(SLOW) == slow]


@pytest.mark.slow
def test_every_python_block_runs_in_order(monkeypatch):
  monkeypatch.chdir(REPO)
  namespace = {"__name__": "your_model_md"}
  python = blocks("python")
  assert len(python) >= 3
  for i, code in enumerate(python):
    exec(compile(code, f"docs/your_model.md, python block {i + 1}", "exec"), namespace)
  report = namespace["report"]  # the last evaluation the document prints
  assert 0.0 <= report["robust_accuracy"][-1] <= report["clean_accuracy"] <= 1.0
  statuses = {check["status"] for check in namespace["checklist"]["checks"]}
  assert len(namespace["checklist"]["checks"]) >= 8 and statuses <= {"PASS", "WARN", "FAIL"}
  # The slow blocks at least compile and name only what the executed blocks defined.
  for code in blocks("python", slow=True):
    names = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)]
    stored = {n.id for n in names if isinstance(n.ctx, ast.Store)}
    undefined = {n.id for n in names} - stored - {*namespace, *dir(builtins)}
    assert not undefined, f"a slow block uses names no block defines: {undefined}"


def _with(args: list[str], flag: str, value: str) -> list[str]:
  """args with `flag`'s value replaced (or the flag added)."""
  if flag in args:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]
  return [*args, flag, value]


@pytest.mark.slow
def test_the_robustbench_command_runs_on_a_random_checkpoint(tmp_path):
  """The document's eval.py line on a random state_dict of its --arch family at width 1 (the
  same depth and key layout; the full width costs a minute on a CPU, and test_torch_import
  checks the import per arch), at 4 images with FGSM: the flags, the arch name and the
  checkpoint path are the document's, only the sizes are cut."""
  torch = pytest.importorskip("torch")
  from tests import torch_archs
  (command,) = [line for block in blocks("bash") for line in block.splitlines()
                if line.startswith("python eval.py")]
  args = shlex.split(command)
  arch = args[args.index("--arch") + 1]
  depth = int(re.fullmatch(r"wrn-(\d+)-\d+", arch).group(1))
  checkpoint = tmp_path / "model.pt"
  torch.save(torch_archs.randomised(torch_archs.WideResNet(depth, 1)).state_dict(), checkpoint)
  args = _with(args, "--torch_model", str(checkpoint))
  for flag, value in (("--num_examples", "4"), ("--attack", "fgsm"), ("--batch_size", "4"),
                      ("--output", str(tmp_path / "out.json"))):
    args = _with(args, flag, value)
  narrow = (f"import functools, runpy, sys; from gfa_jax import torch_import as t; "
            f"t.ARCHS[{arch!r}] = functools.partial(t.ARCHS[{arch!r}], width=1); "
            f"sys.argv = {args[1:]!r}; runpy.run_path('eval.py', run_name='__main__')")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  run = subprocess.run([sys.executable, "-c", narrow], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["attack"] == "fgsm" and report["num_examples"] == 4
  assert report["clean_accuracy"] >= report["robust_accuracy"][0] >= 0.0


def test_the_readme_s_first_snippet_trains_with_gfa():
  """README's first screen (GFA on your own NNX model) runs: two train steps change the
  weights and report a finite alignment for each named layer."""
  import jax
  import numpy as np
  code = re.search(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)[1]
  namespace = {}
  exec(compile(code, "README.md, first python block", "exec"), namespace)
  model, optimizer = namespace["model"], namespace["optimizer"]
  before = np.asarray(model.head.kernel[...])
  x = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
  for _ in range(2):
    alignment = namespace["train_step"](model, optimizer, x, np.arange(4))
  assert set(alignment) == {"conv", "head"}
  assert all(np.isfinite(float(cos)) for cos in jax.tree.leaves(alignment))
  assert not np.allclose(np.asarray(model.head.kernel[...]), before)

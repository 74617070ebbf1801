"""gfa_jax.quickstart: the table, reading, summary.json and PNG come from the runs themselves."""

import json
from pathlib import Path

from configs import tiny
from gfa_jax import quickstart, reporting


def _record(name, clean, robust, alignment, degenerate=None):
  return {"name": name, "clean_accuracy": clean, "robust_accuracy": robust,
          "mean_train_alignment": alignment, "degenerate": degenerate}


def test_quickstart_tables_what_its_runs_measured(tmp_path):
  gfa = tiny.get_config()
  gfa.num_epochs = 1  # 8 steps of 32 images, evaluated at steps 4 and 8
  gfa.eval_every_steps = 4
  runs = [quickstart.Run("tiny GFA", gfa, tmp_path / "gfa")]  # one run: compiling is the cost
  summary = quickstart.run_quickstart(runs, tmp_path / "out", num_examples=40)

  lines = reporting.quickstart_lines(summary)
  for run, record in zip(runs, summary["runs"]):
    attack = json.loads(Path(record["attack_json"]).read_text())
    logged = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if r["kind"] == "eval"][-1]
    assert record["steps"] == final["step"] == 8 and record["num_examples"] == 40
    assert record["clean_accuracy"] == attack["clean_accuracy"]
    assert record["robust_accuracy"] == attack["robust_accuracy"][0]
    assert record["degenerate"] == attack["degenerate"]
    assert record["train_alignment"] == {k.split("/")[-1]: v for k, v in final.items()
                                         if k.startswith("train/alignment/")}
    assert set(record["train_alignment"]) >= {"layer0", "layer1", "layer2"}
    assert record["curves"]["step"] == [4, 8]
    assert record["curves"]["test_accuracy"][-1] == final["test/accuracy"]
    row = next(line for line in lines if line.startswith(record["name"]))
    assert reporting.pct(record["clean_accuracy"]) in row
    assert f'{record["train_alignment"]["layer1"]:+.2f}' in row
    assert row.endswith("no" if record["degenerate"] is None else record["degenerate"].split(":")[0]
                        .replace("collapsed", "yes"))
  assert summary["runs"][0]["beta"] == gfa.beta and summary["runs"][0]["objective"] == "gfa"
  assert json.loads((tmp_path / "out" / "summary.json").read_text())["runs"] == summary["runs"]
  assert Path(summary["files"]["plot"]).read_bytes()[:4] == b"\x89PNG"
  assert summary["reading"] == quickstart.reading(summary["runs"])
  assert lines[-2:] == [f"wrote {path}" for path in summary["files"].values()]


def test_the_reading_follows_the_numbers():
  collapsed = "collapsed: predicts class 3 for 59 % of inputs (2 of 10 classes); clean ..."
  records = [_record("deep", 0.144, 0.0, 0.47, collapsed), _record("std", 0.36, 0.0, -0.01),
             _record("weak", 0.35, 0.02, 0.0)]
  text = "\n".join(quickstart.reading(records))
  assert "deep is degenerate: it predicts class 3 for 59 % of inputs (2 of 10 classes)." in text
  assert "(deep +0.47, std -0.01, weak +0.00) rose above 0.1 only in deep, which collapsed." in text
  assert "classify correctly, APGD-CE at Linf 8/255 breaks std 100.0%, weak 94.3%." in text
  records[0]["degenerate"] = None
  records[2]["mean_train_alignment"] = 0.3
  text = "\n".join(quickstart.reading(records))
  assert "No model collapsed" in text and "only in deep, weak." in text
  assert "breaks deep 100.0%, std 100.0%, weak 94.3%." in text
  records[0]["mean_train_alignment"] = records[2]["mean_train_alignment"] = 0.02
  text = "\n".join(quickstart.reading(records))
  assert "stayed below 0.1 everywhere" in text

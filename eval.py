"""Evaluates a checkpoint: `python eval.py --workdir DIR --attack apgd` (docs/evaluation.md).

A thin main over gfa_jax.evaluators: every attack of gfa_jax.evaluate (`--eps 0,1/255,8/255`
gives a curve in one call, `--attack all` runs every attack supporting `--norm`) and the
analyses `checklist`, `alignment` and `mechanism`. Test examples are the first `--num_examples`
of the test split of the run's data set, in order.
"""

import os
import shutil
import signal
import sys
from pathlib import Path

# Ctrl-C while the libraries load ends the process at once, with no traceback; from
# gfa_jax.cli.run on it prints how to resume.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from absl import flags, logging

from gfa_jax import (checkpoints, cli, data, distributed, evaluate, evaluators, reporting,
                     run_files, xla_flags)
from gfa_jax.attacks import core

F = flags
_WORKDIR = F.DEFINE_string("workdir", "runs/quickstart", "Training workdir, or a params-only "
                           ".msgpack checkpoint (data: $GFA_DATA_DIR, else the embedded subset).")
_STEP = F.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ATTACK = F.DEFINE_string("attack", None, f"An attack ({', '.join(evaluate.attack_names())}) or "
                          f"an analysis ({', '.join(evaluators.analyses())}).")
_EPS = F.DEFINE_string("eps", None, "eps, or a comma-separated list for a curve; fractions "
                       "allowed (8/255). Default: 8/255 (linf), 0.5 (l2), 12 (l1).")
_NORM = F.DEFINE_string("norm", "linf", "Threat model norm: linf, l2 or l1 (EAD only).")
_NUM_EXAMPLES = F.DEFINE_integer("num_examples", 1000, "First N test examples.")
_BATCH_SIZE = F.DEFINE_integer("batch_size", 500, "Images per model call (memory bound).")
_SEED = F.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.")
_OUTPUT = F.DEFINE_string("output", None, "Result JSON, or folder for checklist/mechanism "
                          "(default: <workdir>/eval/<attack>_<norm>.json).")
_PLOT = F.DEFINE_string("plot", None, "Optional PNG of robust accuracy vs eps.")
_DATA_DIR = F.DEFINE_string("data_dir", None, "Data folder (default: $GFA_DATA_DIR, else the "
                            "run's config, else the embedded subset).")
_SURROGATE = F.DEFINE_string("surrogate", None, "checklist: a standard-trained model for the "
                             "transfer attack of check 3 (without it: WARN 'not run').")
_COMPARE = F.DEFINE_string("compare", None, "mechanism: a second model drawn beside the first.")
_BUDGET = F.DEFINE_enum("budget", "default", ["default", "quick"], "checklist: attack budget.")
_SUBSET = F.DEFINE_string("subset", None, "File of example indices: also report robust "
                          "accuracy on those examples only (the paper's protocol).")
_AA_VERSION = F.DEFINE_enum("aa_version", "standard", ["standard", "rand", "fast", "custom"],
                            "autoattack: the version; 'fast' (APGD-CE + APGD-T) is never "
                            "reported as the standard AutoAttack.")
_AA_ATTACKS = F.DEFINE_list("aa_attacks", [], "autoattack --aa_version custom: the attacks in "
                            "order, from apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square.")
_TORCH_MODEL = F.DEFINE_string("torch_model", None, "A PyTorch state_dict (.pt/.pth) to attack "
                               "instead of --workdir (needs torch; see --arch).")
_ARCH = F.DEFINE_enum("arch", "resnet18", sorted(evaluators.torch_import.ARCHS),
                      "--torch_model's architecture: resnet18 (Kuang Liu's), preact_resnet18 "
                      "(RobustBench's), wrn-D-W (RobustBench's WideResNet), dm-wrn-D-W / "
                      "dm-preact-resnet18 (DeepMind's: swish, CIFAR-10 mean/std inside).")
_ATTACK_CONSTANT = F.DEFINE_boolean("attack_constant_models", False, "Attack even a model whose "
                                    "logits do not depend on its input (default: such a model "
                                    "is not attacked; robust = clean, and the report says so).")
_KEEP_PROGRESS = F.DEFINE_boolean("keep_progress", False, "attacks: keep <output>.progress/ (the "
                                  "finished batches a rerun resumes from) after the JSON is "
                                  "written; by default it is deleted then.")
F.mark_flag_as_required("attack")
DEFAULT_EPS = {"linf": "8/255", "l2": "0.5", "l1": "12"}
DEFAULT_OUTPUT = {"alignment": "alignment.json", "mechanism": "mechanism"}


def check_flags(path: Path) -> None:
  """Flag combinations that would fail (or mislead) only after the work: refused first."""
  folder_output = _ATTACK.value in ("checklist", "mechanism")
  if _OUTPUT.value and not folder_output and Path(_OUTPUT.value).is_dir():
    raise ValueError(f"--output {_OUTPUT.value} is a folder; give the JSON file to write "
                     f"(e.g. {Path(_OUTPUT.value) / 'result.json'})")
  if _STEP.value is not None and path.is_file() and not _TORCH_MODEL.value:
    raise ValueError(f"--step {_STEP.value} needs a training workdir, but {path} is a "
                     "params-only file holding one step; drop --step or pass the workdir")
  for flag, what in ((_BATCH_SIZE, "images per model call"),
                     (_NUM_EXAMPLES, "the first N test examples are evaluated")):
    if flag.value < 1:
      raise ValueError(f"--{flag.name} must be >= 1, got {flag.value}; {what}")
  if _ATTACK.value in evaluators.analyses() and _TORCH_MODEL.value:
    raise ValueError(f"--torch_model supports the attacks, not the analyses {evaluators.analyses()}.")


def data_source(config) -> tuple[str, str | None]:
  """(data source, folder) to evaluate on: the run's source with --data_dir, else
  $GFA_DATA_DIR, else the run's config's folder.

  A folder the run's source would ignore is not passed over in silence: a model trained on the
  embedded subset is evaluated on that subset, so an explicit --data_dir is refused and
  $GFA_DATA_DIR gets a notice; with source 'auto' an explicit --data_dir must hold CIFAR-10
  (no quiet fallback to the subset).
  """
  given = _DATA_DIR.value or os.environ.get(data.DATA_DIR_ENV)
  if config.data_source == "embedded" and given:
    if _DATA_DIR.value:
      raise ValueError(f"--data_dir {given} would be ignored: this model was trained on the "
                       "embedded CIFAR-10 subset (its config's data_source), and eval.py "
                       "evaluates on the data its run used; drop --data_dir")
    print(f"note: ${data.DATA_DIR_ENV} ({given}) is not used: this model was trained on the "
          "embedded subset, which is what is evaluated", file=sys.stderr)
    return "embedded", None
  if config.data_source == "auto" and _DATA_DIR.value:
    return "cifar10", _DATA_DIR.value
  return config.data_source, given or config.get("data_dir") or None


def run() -> None:
  path = Path(_TORCH_MODEL.value or _WORKDIR.value)
  check_flags(path)
  evaluator = evaluators.get(_ATTACK.value)  # Bad flags fail before anything is loaded.
  eps_text = _EPS.value or DEFAULT_EPS.get(_NORM.value, "0")
  eps = tuple(core.parse_eps_list(eps_text))
  if _ATTACK.value not in evaluators.analyses():
    evaluate.validate(_ATTACK.value, eps, _NORM.value)
  overrides = None
  if _ATTACK.value == "autoattack" and (_AA_VERSION.value != "standard" or _AA_ATTACKS.value):
    overrides = {"version": _AA_VERSION.value, "attacks": tuple(_AA_ATTACKS.value)}
  try:
    model = evaluators.load_model(path, _STEP.value,
                                  torch_arch=_TORCH_MODEL.value and _ARCH.value)
  except (TypeError, KeyError, AttributeError) as e:  # A hand-edited or foreign config.json.
    raise ValueError(f"{path}: its config cannot build the model ({type(e).__name__}: "
                     f"{cli.one_line(e)[:160]}); restore the run's config.json or retrain") from e
  # Where the result goes is checked before the work: an hours-long attack must not be lost.
  folder_output = _ATTACK.value in ("checklist", "mechanism")
  name = DEFAULT_OUTPUT.get(_ATTACK.value, f"{_ATTACK.value}_{_NORM.value}" +
                            ("" if folder_output else ".json"))
  output = Path(_OUTPUT.value or (path if path.is_dir() else path.parent) / "eval" / name)
  # Attacks store each finished batch there: rerunning the command resumes (gfa_jax.eval_units),
  # and several processes split the batches through it (it must be on a shared file system).
  progress = (None if _ATTACK.value in evaluators.analyses()
              else output.with_name(output.name + ".progress"))
  request = evaluators.Request(
      norm=_NORM.value, eps=eps, eps_text=eps_text, num_examples=_NUM_EXAMPLES.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value, overrides=overrides, budget=_BUDGET.value,
      subset=tuple(cli.read_indices(_SUBSET.value)) if _SUBSET.value else None,
      surrogate=_SURROGATE.value and evaluators.load_model(_SURROGATE.value) or None,
      compare=_COMPARE.value and evaluators.load_model(_COMPARE.value) or None,
      resume_dir=progress and str(progress))
  source, data_dir = data_source(model.config)
  if distributed.is_primary():
    run_files.check_writable(output, folder=folder_output)
    if _PLOT.value:
      run_files.check_writable(_PLOT.value)
  dataset = data.load_dataset(source, data_dir)
  result = evaluator(model, lambda split, n: data.first_examples(dataset, split, n), request)
  step = _STEP.value if _STEP.value is not None or not path.is_dir() else checkpoints.latest_step(path)
  result.report.update(checkpoint={"path": str(path), "step": step}, data=dataset.description,
                       subset_file=_SUBSET.value, git_commit=evaluate.git_commit())
  hint = "" if data_dir else f" (for all of CIFAR-10 pass --data_dir or set ${data.DATA_DIR_ENV})"
  # With several processes each one computed its share of the attack batches and read the
  # others' from the progress folder, so every process holds the whole result; process 0
  # reports and writes.
  if distributed.is_primary():
    print("\n".join([f"data: {dataset.description}{hint}", *result.lines]))
    for written in result.write(output):
      print(f"wrote {written}")
    if _PLOT.value and "attacks" in result.report:  # robust accuracy vs eps
      print(f"wrote {reporting.plot_robust_accuracy(result.report, _PLOT.value)}")
  if progress is None:
    return
  distributed.sync("evaluation written")  # no process still reads the progress folder
  if not distributed.is_primary():
    return
  if _KEEP_PROGRESS.value:
    print(f"kept {progress} (--keep_progress)")
  else:
    shutil.rmtree(progress, ignore_errors=True)


def main(argv):
  del argv
  xla_flags.use_fast_cpu_convolutions()  # Before the first computation reads $XLA_FLAGS.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  run()  # Bad flags, run, data: one line and exit 2 (gfa_jax.cli).


if __name__ == "__main__":
  cli.run(main, resume="rerun the same command: an attack carries on from <output>.progress/")

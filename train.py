"""Trains a model with the objective of a config: `python train.py --config configs/cifar_deep.py`.

Overrides: `--config.beta=0.5 --config.data_dir=/data`. `--workdir` defaults to
`runs/<config file name>`; rerunning the same command resumes from its latest checkpoint.
"""

import signal
from pathlib import Path

# Ctrl-C while the libraries load ends the process at once, with no traceback; from
# gfa_jax.cli.run on it prints how to resume.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from absl import flags, logging
from ml_collections import config_flags

from gfa_jax import cli, train_lib, xla_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/quickstart.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>).")


def main(argv):
  del argv
  xla_flags.use_fast_cpu_convolutions()  # Before the first computation reads $XLA_FLAGS.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  config_name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
  workdir = _WORKDIR.value or str(Path("runs") / config_name)
  train_lib.train_and_evaluate(_CONFIG.value, workdir)  # Bad input: one line (gfa_jax.cli).


if __name__ == "__main__":
  cli.run(main, resume="rerun the same command to resume from its last checkpoint")

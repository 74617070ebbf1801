"""GFA-DEEP on the embedded CIFAR-10 subset (2,000 train / 500 test), the paper's setting (MSE,
beta 0.1): the first run of `make quickstart` (gfa_jax.quickstart) and `python train.py`'s default.

Four epochs (60 steps) are enough to show the collapse docs/results.md reports; the
quickstart's other runs (quickstart_standard.py, quickstart_weak.py) override this one.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data_source = "embedded"
  config.num_epochs = 4
  config.log_every_steps = 5
  config.eval_every_steps = 15  # one evaluation per epoch: the quickstart's curves
  config.num_train_eval_examples = 500  # the train alignment, on a quarter of the subset
  config.checkpoint_every_steps = 30
  return config

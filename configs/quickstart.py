"""GFA-DEEP on the embedded CIFAR-10 subset (2,000 train / 500 test): ~3 minutes on 2 cores."""

from configs import default


def get_config():
  config = default.get_config()
  config.data_source = "embedded"
  config.num_epochs = 10
  config.log_every_steps = 10
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  return config

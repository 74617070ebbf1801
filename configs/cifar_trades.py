"""TRADES (beta 6), Linf 8/255, 7 inner steps of 2/255, cross-entropy."""

from configs import default


def get_config():
  config = default.get_config()
  config.objective = "trades"
  config.task_loss = "ce"
  return config

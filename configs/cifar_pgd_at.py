"""Madry PGD adversarial training, Linf 8/255, 7 steps of 2/255, cross-entropy."""

from configs import default


def get_config():
  config = default.get_config()
  config.objective = "pgd_at"
  config.task_loss = "ce"
  return config

"""FGSM training + GradAlign (lambda 0.2), Linf 8/255, cross-entropy."""

from configs import default


def get_config():
  config = default.get_config()
  config.objective = "gradalign"
  config.task_loss = "ce"
  return config

"""Standard training with the paper's MSE task loss (baseline; no penalty)."""

from configs import default


def get_config():
  config = default.get_config()
  config.objective = "standard"
  return config

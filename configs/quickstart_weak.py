"""The quickstart's other GFA regime: configs/quickstart.py with beta 0.03, below the threshold
(MSE: 0.05, docs/results.md) where the penalty is ignored: alignment about 0, a standard-like
model."""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.beta = 0.03
  return config

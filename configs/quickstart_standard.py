"""The quickstart's standard model: configs/quickstart.py without the GFA penalty (the paper's
MSE), its alignment still measured so the table can compare it."""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.objective = "standard"
  config.eval_alignment = True
  return config

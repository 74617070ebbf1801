"""GFA-FIRST: align the gradient with the (normalised) input image only."""

from configs import default


def get_config():
  config = default.get_config()
  config.gfa_layers = ("layer0",)
  return config

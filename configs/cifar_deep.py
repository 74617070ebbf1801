"""GFA-DEEP (layer0..layer2) on full CIFAR-10: the paper's DeepDefense setting."""

from configs import default


def get_config():
  return default.get_config()

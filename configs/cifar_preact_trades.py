"""TRADES (cifar_trades.py: beta 6, Linf 8/255, 7 steps, cross-entropy) on PreActResNet-18
(BatchNorm), with the SGD recipe of batchnorm_models.py."""

from configs import batchnorm_models, cifar_trades


def get_config():
  return batchnorm_models.get_config("preact", cifar_trades)

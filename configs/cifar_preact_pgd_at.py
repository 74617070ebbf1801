"""PGD-AT (cifar_pgd_at.py: Linf 8/255, 7 steps of 2/255, cross-entropy) on PreActResNet-18
(BatchNorm), with the SGD recipe of batchnorm_models.py."""

from configs import batchnorm_models, cifar_pgd_at


def get_config():
  return batchnorm_models.get_config("preact", cifar_pgd_at)

"""GFA-DEEP (cifar_deep.py: layer0..layer2, MSE, beta 0.1) on WRN-34-10
(BatchNorm), with the SGD recipe of batchnorm_models.py."""

from configs import batchnorm_models, cifar_deep


def get_config():
  return batchnorm_models.get_config("wrn34", cifar_deep)

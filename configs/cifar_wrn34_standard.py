"""Standard training (cifar_standard.py: the paper's MSE, no penalty) on WRN-34-10
(BatchNorm), with the SGD recipe of batchnorm_models.py."""

from configs import batchnorm_models, cifar_standard


def get_config():
  return batchnorm_models.get_config("wrn34", cifar_standard)

"""Standard training (the paper's MSE, no penalty) of ResNet20 (GroupNorm) on CIFAR-10.

Same recipe as cifar_standard.py (Adam 1e-3, cosine, 30 epochs) so the models compare; He et
al.'s own recipe is ``--config.optimizer=sgd --config.learning_rate=0.1
--config.weight_decay=1e-4 --config.num_epochs=160``.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "resnet20"  # gfa_jax.models.ResNet20: 269,722 params, GroupNorm.
  config.objective = "standard"  # No GFA penalty: the baseline for cifar_resnet20_deep.py.
  return config

"""The recipe of the BatchNorm architectures of robust-training papers, PreActResNet-18 and
WRN-34-10, shared by ``configs/cifar_preact_*.py`` and ``configs/cifar_wrn34_*.py``.

A GPU-scale recipe (the PGD-AT / TRADES code bases'): SGD with momentum 0.9 (PyTorch's heavy
ball), learning rate 0.1 decayed to 0 by a cosine, weight decay 5e-4 added to the gradient of
every parameter (as torch's ``SGD(weight_decay=5e-4)``), batch 128, 100 epochs (the papers
train 100-200; ``--config.num_epochs=200`` for the long one), random crop and flip. The
objective, task loss, attack and GFA taps are the base config's (``cifar_standard``,
``cifar_pgd_at``, ``cifar_trades``, ``cifar_deep``), so a BatchNorm run differs from its
SmallCNN counterpart only in the model and the optimiser.

BatchNorm trains on batch statistics and evaluates on running averages
(``gfa_jax.train_lib``); the inner attacks of pgd_at / trades run in inference mode (why:
``gfa_jax.objectives``, "Models with state"). GFA-DEEP taps ``layer0`` (the normalised image),
``layer1`` (the stem's output, block 1's input) and ``layer2`` (block 2's input); with the
statistics of the batch a sample's cosine also sees the other samples (``gfa_jax.penalty``).
"""

import ml_collections

# config.model of each architecture (gfa_jax.models); mean/std stay default.py's.
ARCHITECTURES = {
    "preact": {"name": "preact_resnet18"},  # RobustBench's PreActResNet18, 11.2 M params.
    "wrn34": {"name": "wrn", "depth": 34, "width": 10},  # WRN-34-10, 46.2 M params.
}


def get_config(architecture: str, base) -> ml_collections.ConfigDict:
  """``base.get_config()`` (a config module) on ``architecture`` (an ARCHITECTURES key) with
  the recipe's optimiser and length."""
  config = base.get_config()
  config.model.update(ARCHITECTURES[architecture])
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.schedule = "cosine"
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.num_epochs = 100
  return config

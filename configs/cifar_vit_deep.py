"""GFA-DEEP on a small ViT on CIFAR-10: align at the image and two transformer-block inputs.

For the ViT, ``layer0`` is the normalised image, ``layer1`` the tokens the first block sees
(patch embedding + position embedding) and ``layer2`` the input of the second block. Otherwise
cifar_deep.py's recipe (MSE, beta 0.1, Adam 1e-3, 30 epochs) plus a short warm-up.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "vit"  # gfa_jax.models.ViT with its defaults (patch 4, width 128, ...).
  config.gfa_layers = ("layer0", "layer1", "layer2")  # The default, restated: image, blocks 1-2.
  config.warmup_epochs = 2.0  # Transformers under Adam at 1e-3 are unstable without warm-up.
  return config

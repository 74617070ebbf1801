"""Standard training (the paper's MSE, no penalty) of a small ViT on CIFAR-10.

ViT: 4x4 patches (64 tokens), width 128, depth 4, 4 heads, MLP 256 (545,930 params). The
recipe is cifar_standard.py's (Adam 1e-3, cosine, 30 epochs) plus a short warm-up.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "vit"  # gfa_jax.models.ViT with its defaults (patch 4, width 128, ...).
  config.objective = "standard"  # No GFA penalty: the baseline for cifar_vit_deep.py.
  config.warmup_epochs = 2.0  # Transformers under Adam at 1e-3 are unstable without warm-up.
  return config

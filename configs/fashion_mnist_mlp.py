"""The paper's MLP setting: GFA-DEEP on a three-hidden-layer MLP, Fashion-MNIST, MSE.

  python train.py --config configs/fashion_mnist_mlp.py --config.data_dir=DIR

DIR holds the four Fashion-MNIST IDX files (gzip or not; gfa_jax.data reads `DIR`,
`DIR/fashion-mnist/` or torchvision's `DIR/FashionMNIST/raw/`). Grey 28x28 images: one
normalisation value, no crop or flip augmentation (clothes have a left and a right side
only up to the flip, but the paper trains without augmentation).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "mlp"
  config.model.mean, config.model.std = (0.5,), (0.5,)
  config.data_source = "fashion_mnist"
  config.crop_padding = 0
  config.flip = False
  return config

"""GFA-DEEP on ResNet20 (GroupNorm) on CIFAR-10: align at the image and two block inputs.

For ResNet20, ``layer0`` is the normalised image, ``layer1`` the input of the first residual
block (the stem's output) and ``layer2`` the input of the second. Everything else is
cifar_deep.py's recipe (MSE, beta 0.1, Adam 1e-3, 30 epochs).

The paper's DEEP taps are kept, but layer0's cosine is 0 for any parameters (the stem conv has
no bias and feeds GroupNorm, so the loss is scale invariant in the image): its penalty is the
constant 1 and training warns about it. ``--config.gfa_layers="('layer1','layer2','layer3')"``
taps three layers that can align.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "resnet20"  # gfa_jax.models.ResNet20: 269,722 params, GroupNorm.
  config.gfa_layers = ("layer0", "layer1", "layer2")  # The default, restated: image, blocks 1-2.
  return config

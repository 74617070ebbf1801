"""Adversarial attacks as pure, jit-able functions of a model's logits.

Every attack has the signature `x_adv = attack(logits_fn, x, y, *, key, eps, norm, ...)` with
images in [0, 1] (NHWC) and `logits_fn` mapping images to logits; shared plumbing (losses,
projections, input checks, eps parsing) lives in `core`. The package exports the attack
functions, so `gfa_jax.attacks.pgd` is the function; import helpers from the modules by their
full path, e.g. `from gfa_jax.attacks.apgd import checkpoint_iterations`.
"""

from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd, apgd_t
from gfa_jax.attacks.fgsm import fgsm
from gfa_jax.attacks.pgd import pgd

__all__ = ["core", "fgsm", "pgd", "apgd", "apgd_t"]

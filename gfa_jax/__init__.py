"""gfa-jax: Gradient-Feature Alignment (DeepDefense) training and honest robustness evaluation."""

from gfa_jax.adapters import as_model
from gfa_jax.checkpoints import load_model
from gfa_jax.evaluators import robustness
from gfa_jax.penalty import gfa_objective, gfa_penalty, tap, tap_module_inputs, zero_taps
from gfa_jax.torch_import import load_torch_model

__all__ = ["as_model", "gfa_objective", "gfa_penalty", "load_model", "load_torch_model",
           "robustness", "tap", "tap_module_inputs", "zero_taps"]
__version__ = "0.1.0"

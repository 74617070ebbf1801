"""gfa-jax: Gradient-Feature Alignment (DeepDefense) training and honest robustness evaluation."""

from gfa_jax.penalty import gfa_objective, gfa_penalty, tap, tap_module_inputs, zero_taps

__all__ = ["gfa_objective", "gfa_penalty", "tap", "tap_module_inputs", "zero_taps"]
__version__ = "0.1.0"

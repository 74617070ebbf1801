"""Minimum-norm attacks per example against Foolbox 3.3.4 on a tiny twin MLP (JAX and torch).

The same weights in both frameworks; each side's attack runs on the whole batch with the same
settings (so CW's and EAD's whole-batch early abort sees the same batch), and the per-example
norms of the two must agree. scripts/crosscheck_minnorm.py does this on the committed models.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fb = pytest.importorskip("foolbox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gfa_jax.attacks import cw, deepfool, ead  # noqa: E402

# The slow set (make test-slow; CI runs it too): cross-checks against foolbox and torchattacks.
pytestmark = pytest.mark.slow

BATCH, SHAPE, HIDDEN, CLASSES = 24, (4, 4, 3), 32, 5


def twins(seed=0):
  """(JAX logits_fn on NHWC, torch module on NCHW, x NHWC, y): one random ReLU MLP whose labels
  are its own clean predictions, so every point is clean-correct."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(SHAPE))
  w1 = rng.normal(0, 1 / np.sqrt(dim), (dim, HIDDEN)).astype(np.float32)
  b1 = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
  w2 = rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, CLASSES)).astype(np.float32)
  b2 = np.zeros(CLASSES, np.float32)
  logits_fn = lambda v: jax.nn.relu(v.reshape(v.shape[0], -1) @ w1 + b1) @ w2 + b2

  class Net(torch.nn.Module):
    def forward(self, v):
      flat = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)  # NHWC order, as the JAX side
      return torch.relu(flat @ torch.from_numpy(w1) + torch.from_numpy(b1)) @ torch.from_numpy(
          w2) + torch.from_numpy(b2)

  x = rng.uniform(0.2, 0.8, (BATCH,) + SHAPE).astype(np.float32)
  y = np.asarray(logits_fn(jnp.asarray(x))).argmax(1).astype(np.int32)
  return logits_fn, Net().eval(), x, y


def both_sides(ours, theirs, ord):
  """Per-example norms [BATCH] of gfa-jax's and Foolbox's results, and their success masks."""
  logits_fn, net, x, y = twins()
  x_ours = np.asarray(jax.jit(lambda v, t: ours(logits_fn, v, t))(jnp.asarray(x), jnp.asarray(y)))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  x_fb = theirs.run(fb.PyTorchModel(net, bounds=(0, 1)), xt, torch.from_numpy(y.astype(np.int64)))
  x_fb = x_fb.numpy().transpose(0, 2, 3, 1)
  fooled = lambda v: np.asarray(logits_fn(jnp.asarray(v))).argmax(1) != y
  norm = lambda v: np.linalg.norm((v - x).reshape(BATCH, -1).astype(np.float64), ord=ord, axis=1)
  return norm(x_ours), norm(x_fb), fooled(x_ours), fooled(x_fb)


@pytest.mark.parametrize("name, ours, theirs, ord, rtol", [
    # DeepFool is deterministic and the same algorithm on both sides: equal to float rounding.
    ("deepfool-l2", lambda f, x, y: deepfool.deepfool(f, x, y, norm="l2"),
     fb.attacks.L2DeepFoolAttack(), 2, 1e-3),
    ("deepfool-linf", lambda f, x, y: deepfool.deepfool(f, x, y, norm="linf"),
     fb.attacks.LinfDeepFoolAttack(), np.inf, 1e-3),
    # CW: same binary search, whole-batch abort and optimiser; float32 rounding in two
    # frameworks can move a stopping step, so a few percent per point.
    ("cw", lambda f, x, y: cw.cw_l2(f, x, y, binary_search_steps=4, steps=100),
     fb.attacks.L2CarliniWagnerAttack(binary_search_steps=4, steps=100), 2, 0.05),
    # EAD (foolbox's beta, `regularization`, defaults to 1e-2; the authors' and ours to 1e-3)
    # without abort: foolbox checks the smooth loss at the momentum point, the authors' code
    # (and ours) the elastic-net objective at the new iterate, so the abort steps differ.
    ("ead-l1", lambda f, x, y: ead.ead(f, x, y, binary_search_steps=4, steps=100,
                                       decision_rule="L1", abort_early=False),
     fb.attacks.EADAttack(binary_search_steps=4, steps=100, decision_rule="L1",
                          regularization=1e-3, abort_early=False), 1, 0.05),
])
def test_per_example_norms_match_foolbox(name, ours, theirs, ord, rtol):
  ours_norm, fb_norm, ours_fooled, fb_fooled = both_sides(ours, theirs, ord)
  np.testing.assert_array_equal(ours_fooled, fb_fooled, err_msg=name)
  assert ours_fooled.mean() > 0.5, f"{name}: too few points fooled for a comparison"
  ratio = ours_norm[ours_fooled] / fb_norm[ours_fooled]
  assert abs(np.median(ratio) - 1) < rtol, f"{name}: median ratio {np.median(ratio)}"
  assert np.all(np.abs(ratio - 1) < 4 * rtol), f"{name}: ratios {np.sort(ratio)}"

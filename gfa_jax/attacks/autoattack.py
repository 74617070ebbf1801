"""AutoAttack, standard version (Croce & Hein, ICML 2020), and host-side batched execution.

The standard sequence (fra31/auto-attack, autoattack.py, `set_version('standard')`), for linf and
l2, each attack run only on the points that are still robust after the previous ones:

  1. APGD-CE   apgd(loss='ce'), 100 iterations, 1 restart, rho 0.75
  2. APGD-T    apgd_t, targeted DLR loss, 9 target classes, 100 iterations, 1 restart each
  3. FAB-T     fab(targeted=True, eps=eps), 9 target classes, 100 iterations, 1 restart each
  4. Square    square, 5,000 queries, p_init 0.8, 1 restart, schedule not rescaled

"Still robust" is decided by a clean forward pass (host side) of the current worst-case point
before each attack, and a point's adversarial example is replaced only by one that fools the
model, so the result is the per-point worst case over the sequence. The first step removes the
points the model misclassifies without any attack.

Each attack runs through `core.run_in_batches` (one compile per attack, model and batch shape).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import tqdm

from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd, apgd_t
from gfa_jax.attacks.fab import fab
from gfa_jax.attacks.square import square

LogitsFn = Callable[[jax.Array], jax.Array]

# name, attack, hyper-parameters: AutoAttack's standard version for linf and l2.
STANDARD = (
    ('apgd-ce', apgd, (('loss', 'ce'), ('steps', 100), ('n_restarts', 1), ('rho', 0.75))),
    ('apgd-t', apgd_t, (('steps', 100), ('n_restarts', 1), ('num_targets', 9), ('rho', 0.75))),
    ('fab-t', fab, (('targeted', True), ('num_targets', 9), ('steps', 100), ('n_restarts', 1),
                    ('alpha_max', 0.1), ('eta', 1.05), ('beta', 0.9))),
    ('square', square, (('n_queries', 5000), ('p_init', 0.8), ('n_restarts', 1),
                        ('loss', 'margin'), ('rescale_schedule', False))),
)
VERSIONS = ('standard',)
NORMS = ('linf', 'l2')


def autoattack(logits_fn: LogitsFn, x, y, *, key: jax.Array, eps: float, norm: str = 'linf',
               version: str = 'standard', batch_size: int = 500, progress: bool = False,
               ) -> tuple[np.ndarray, dict]:
  """Standard AutoAttack; returns (x_adv [N, H, W, C] numpy, breakdown).

  Host-side: runs the sequence in the module docstring, each attack in jit-compiled batches of
  `batch_size` on the points still robust only. Unlike the other attacks it is not traceable
  (it decides on the host which points to attack next).

  breakdown:
    'broken_by': list [N] naming, per point, 'clean' (misclassified without attack), the attack
      that first fooled it, or None (still robust);
    'robust_accuracy_after': {'clean': ..., 'apgd-ce': ..., ...}, the fraction of all N points
      still robust after each step (as AutoAttack logs it);
    'hyperparameters': {attack: {name: value}} actually used.
  """
  if version not in VERSIONS:
    raise ValueError(f'AutoAttack version {version!r} is not implemented; use one of {VERSIONS}.')
  if norm not in NORMS:
    raise ValueError(f'AutoAttack supports norm in {list(NORMS)}, got {norm!r}.')
  core.check_images(x)
  core.check_eps(eps, norm)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  n = len(x)
  robust = core.predict(logits_fn, x, batch_size) == y
  broken_by = np.where(robust, None, 'clean').astype(object)
  robust_after = {'clean': float(robust.mean()) if n else 0.0}
  x_adv = x.copy()
  for index, (name, attack, hparams) in enumerate(STANDARD):
    todo = np.flatnonzero(robust)
    if len(todo):
      bar = tqdm.tqdm(total=-(-len(todo) // batch_size), desc=f'autoattack/{name}',
                      disable=not progress, leave=False)
      with bar:
        candidates = core.run_in_batches(
            attack, logits_fn, x[todo], y[todo], key=jax.random.fold_in(key, index),
            batch_size=batch_size, eps=eps, hparams=(('norm', norm),) + hparams, progress=bar,
            bucket=True)
      fooled = core.predict(logits_fn, candidates, batch_size) != y[todo]
      x_adv[todo[fooled]] = candidates[fooled]
      robust[todo[fooled]] = False
      broken_by[todo[fooled]] = name
    robust_after[name] = float(robust.mean()) if n else 0.0
  breakdown = {'broken_by': broken_by.tolist(), 'robust_accuracy_after': robust_after,
               'hyperparameters': {name: dict(hp) for name, _, hp in STANDARD}}
  return x_adv, breakdown

"""AutoAttack (Croce & Hein, ICML 2020): its versions, its automatic checks, host-side batching.

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
Inside it, APGD-CE, APGD-T and FAB-T step only the points not yet fooled (`compact`): a point
stops once it fools, and each target of APGD-T and FAB-T attacks only the points no earlier
target fooled, as the reference's `perturb` loops over targets on the points still robust.

Versions (the reference's `version=`): `standard` (above); `rand`, for randomised defences,
APGD-CE then APGD-DLR, 1 restart, EOT over 20 draws; `custom`, any sequence of the attacks in
`ATTACKS` with the standard settings (`attacks=(...)`); and `fast`, APGD-CE then APGD-T, which
the reference does not have: a cheap curve, never to be reported as "AutoAttack" without the
qualifier (`label()` gives the name to report).

The reference's automatic checks (autoattack/checks.py) run before and after the attacks and
are returned (and logged as warnings) in the breakdown: a randomised forward pass, outputs that
look like probabilities, points with a zero input gradient, Square much stronger than the
white-box attacks, too few classes for the (targeted) DLR loss. The reference's sixth check, a
forward pass that itself computes gradients (a "dynamic" defence, found by tracing torch's
autograd calls), has no JAX counterpart: a jit-compiled logits function is one XLA program
whichever transformations built it, so it is reported as not run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gfa_jax import batching, eval_units, numerics, profiling
from gfa_jax.attacks import core
from gfa_jax.attacks.apgd import apgd, apgd_t
from gfa_jax.attacks.fab import fab
from gfa_jax.attacks.square import square

LogitsFn = Callable[[jax.Array], jax.Array]
LOGGER = logging.getLogger("gfa_jax.autoattack")

_APGD = (("steps", 100), ("n_restarts", 1), ("rho", 0.75))
_FAB = (("num_targets", 9), ("steps", 100), ("n_restarts", 1), ("alpha_max", 0.1),
        ("eta", 1.05), ("beta", 0.9))
# name -> (attack, hyper-parameters): the reference's settings of its standard version.
ATTACKS = {
    "apgd-ce": (apgd, (("loss", "ce"),) + _APGD),
    "apgd-dlr": (apgd, (("loss", "dlr"),) + _APGD),
    "apgd-t": (apgd_t, _APGD + (("num_targets", 9),)),
    "fab": (fab, (("targeted", False),) + _FAB[1:]),
    "fab-t": (fab, (("targeted", True),) + _FAB),
    "square": (square, (("n_queries", 5000), ("p_init", 0.8), ("n_restarts", 1),
                        ("loss", "margin"), ("rescale_schedule", False))),
}
STANDARD_SEQUENCE = ("apgd-ce", "apgd-t", "fab-t", "square")
# version -> (attack names, per-attack hyper-parameter overrides); custom takes `attacks`.
VERSIONS = {
    "standard": (STANDARD_SEQUENCE, {}),
    "rand": (("apgd-ce", "apgd-dlr"), {"apgd-ce": (("eot_iter", 20),),
                                       "apgd-dlr": (("eot_iter", 20),)}),
    "fast": (("apgd-ce", "apgd-t"), {}),
    "custom": ((), {}),
}
NORMS = ("linf", "l2")
STANDARD = tuple((name, *ATTACKS[name]) for name in STANDARD_SEQUENCE)


def label(version: str, attacks: Sequence[str] = ()) -> str:
  """The name to report for a version: only `standard` is plain "AutoAttack"."""
  if version == "standard":
    return "AutoAttack (standard)"
  if version == "fast":
    return "AutoAttack-fast (APGD-CE + APGD-T only; not the standard AutoAttack)"
  if version == "rand":
    return "AutoAttack (rand: APGD-CE + APGD-DLR, EOT 20)"
  return f'AutoAttack (custom: {" + ".join(a.upper() for a in attacks)}; not the standard version)'


def sequence(version: str, attacks: Sequence[str] = ()) -> list[tuple[str, Callable, tuple]]:
  """[(name, attack, hyper-parameters)] that `version` runs, in order; raises ValueError for an
  unknown version or attack, or an attack list given to another version than custom."""
  if version not in VERSIONS:
    raise ValueError(f"AutoAttack version {version!r} is unknown; use one of {list(VERSIONS)}.")
  names, overrides = VERSIONS[version]
  if version == "custom":
    unknown = [a for a in attacks if a not in ATTACKS]
    if not attacks or unknown or len(set(attacks)) != len(attacks):
      raise ValueError(f"version custom needs a list of distinct attacks from {list(ATTACKS)}, "
                       f"got {list(attacks)}.")
    names = tuple(attacks)
  elif attacks:
    raise ValueError(f"an attack list is for version custom only; version {version!r} runs "
                     f"{list(names)}.")
  return [(n, ATTACKS[n][0], ATTACKS[n][1] + overrides.get(n, ())) for n in names]


# --- The reference's checks (autoattack/checks.py), as pure-ish host functions ---------------


def _check(name: str, warning: str | None, **numbers) -> dict:
  if warning:
    LOGGER.warning("AutoAttack check %s: %s", name, warning)
  return {"check": name, "status": "warn" if warning else "ok", "message": warning, **numbers}


def check_randomized(logits_fn: LogitsFn, x, y, n: int = 5, alpha: float = 1e-4) -> dict:
  """Warns if n forward passes of the same batch differ (a randomised defence needs `rand`).

  The passes run outside jit, so randomness drawn on the host is seen too."""
  outputs = [np.asarray(logits_fn(jnp.asarray(x))) for _ in range(n)]
  correct = [int((o.argmax(-1) == y).sum()) for o in outputs]
  unit = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs]
  diff = max((float(np.linalg.norm(a - b, axis=-1).max())
              for i, a in enumerate(unit) for b in unit[i + 1:]), default=0.0)
  randomized = len(set(correct)) > 1 or diff > alpha
  return _check("randomized", "the forward pass is randomised (repeated passes differ); use "
                "version rand." if randomized else None, max_output_difference=diff)


def check_range_output(logits, alpha: float = 1e-5) -> dict:
  """Warns if the outputs look like a probability distribution instead of logits."""
  return _check("range_output", "the outputs look like probabilities: attack the logits."
                if numerics.looks_like_probabilities(logits, alpha) else None)


def check_zero_gradients(logits_fn: LogitsFn, x, y) -> dict:
  """Warns about points whose cross-entropy input gradient is exactly 0 (the reference checks
  APGD's first gradient; here it is taken at the clean points APGD-CE starts around)."""
  grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(core.ce_loss(logits_fn(x), y))))(
      jnp.asarray(x)))
  zero = int((np.abs(grad.reshape(len(x), -1)).sum(-1) == 0).sum())
  return _check("zero_gradients", f"{zero} of {len(x)} points have a zero gradient: gradient-"
                "based attacks may be unreliable on them." if zero else None,
                zero_gradient_points=zero, points_checked=int(len(x)))


def check_square_sr(robust_after: dict, alpha: float = 0.002) -> dict:
  """Warns if Square lowered robust accuracy by more than alpha below every other attack."""
  if "square" not in robust_after or len(robust_after) <= 2:
    return _check("square_sr", None, status_note="Square did not run after another attack")
  before = min(v for k, v in robust_after.items() if k != "square")
  drop = before - robust_after["square"]
  return _check("square_sr", f"Square lowered robust accuracy by {100 * drop:.2f} points after "
                "the white-box attacks: the evaluation may be unreliable (gradient masking?); "
                "run Square with more queries and restarts, or an adaptive attack."
                if drop > alpha else None, square_drop=float(drop))


def check_n_classes(n_classes: int, names: Sequence[str], hparams: dict) -> dict:
  """Warns if the model has too few classes for the (targeted) DLR losses or the targets."""
  warning = None
  if {"apgd-dlr", "apgd-t"} & set(names) and n_classes <= 3:
    warning = f"with {n_classes} classes the (targeted) DLR loss is undefined."
  for name in ("apgd-t", "fab-t"):
    targets = dict(hparams.get(name, ())).get("num_targets", 0)
    if name in names and targets + 1 > n_classes:
      warning = (warning or "") + (f" {name} uses {targets} target classes, but only "
                                   f"{n_classes - 1} exist.")
  return _check("n_classes", warning and warning.strip(), num_classes=int(n_classes))


def check_input_independent(logits_fn: LogitsFn, x, key: jax.Array, eps: float, norm: str,
                            zero_gradients: bool, rtol: float = 1e-6) -> dict:
  """Warns if the logits do not depend on the input: equal (to rtol) on the points to attack,
  on random points of their eps-balls and on uniform-noise images, with a zero input gradient
  at every point. No attack can change such a model's predictions (a collapsed network whose
  ReLUs are all dead): `autoattack` then skips its stages instead of spending their budget."""
  if not zero_gradients or not len(x):
    return _check("input_independent", None)
  key_ball, key_noise = jax.random.split(key)
  x = jnp.asarray(x)
  probes = [x, core.random_init(key_ball, x, eps, norm), jax.random.uniform(key_noise, x.shape)]
  forward = jax.jit(logits_fn)
  logits = np.concatenate([np.asarray(forward(p)) for p in probes])
  spread = float(np.abs(logits - logits[:1]).max())
  constant = spread <= rtol * (1.0 + float(np.abs(logits).max()))
  return _check("input_independent", f"the logits do not depend on the input (equal to "
                f"{spread:.1e} on {len(logits)} clean, eps-ball and noise images, zero "
                "gradients): no attack can change a prediction; the attacks are skipped and "
                "robust accuracy is the clean accuracy." if constant else None,
                max_logit_spread=spread)


def autoattack(logits_fn: LogitsFn, x, y, *, key: jax.Array, eps: float, norm: str = "linf",
               version: str = "standard", attacks: Sequence[str] = (), batch_size: int = 500,
               progress: bool = False, skip_if_constant: bool = True,
               ) -> tuple[np.ndarray, dict]:
  """AutoAttack of `version` (module docstring); returns (x_adv [N, H, W, C] numpy, breakdown).

  Host-side: runs the version's sequence, each attack in jit-compiled batches of `batch_size`
  on the points still robust only. Unlike the other attacks it is not traceable (it decides on
  the host which points to attack next). `logits_fn` is deterministic; `rand` asks its EOT
  draws of it with a key it ignores, which is what the reference computes on such a model.

  breakdown:
    'broken_by': list [N] naming, per point, 'clean' (misclassified without attack), the attack
      that first fooled it, or None (still robust);
    'robust_accuracy_after': {'clean': ..., 'apgd-ce': ..., ...}, the fraction of all N points
      still robust after each step (as AutoAttack logs it);
    'seconds': {'checks': ..., 'apgd-ce': ..., ...}, wall time of the automatic checks with the
      clean pass, and of each step (compilation included), to compare stage by stage with the
      reference's "total time" log lines;
    'compile_seconds', 'compiled_programs': {same keys: ...}, the part of each of those spent
      lowering and compiling programs, and how many programs XLA compiled
      (`profiling.compiled`): what the reference, eager, never pays;
    'hyperparameters': {attack: {name: value}} actually used;
    'version', 'attacks', 'label': what ran and the name to report it under;
    'checks': the reference's automatic checks, [{'check', 'status' ('ok', 'warn' or
      'not run'), 'message', ...numbers}], and ours, `input_independent`;
    'skipped': {attack: reason} of the stages not run (else empty).

  Deviation from the reference: with `skip_if_constant` (default) a model whose logits do not
  depend on the input (`check_input_independent`) is not attacked; every stage is recorded as
  skipped, with robust accuracy = clean accuracy, which is what every attack would leave.
  """
  steps = sequence(version, attacks)
  if norm not in NORMS:
    raise ValueError(f"AutoAttack supports norm in {list(NORMS)}, got {norm!r}.")
  core.check_images(x)
  core.check_eps(eps, norm)
  if np.ndim(eps) != 0:
    raise ValueError(f"autoattack: eps must be one number, got {eps!r:.80}; call it once per "
                     "eps, or use gfa_jax.evaluate.evaluate(..., eps=[...]) for a curve")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  x = np.asarray(x, np.float32)
  numerics.check_labels(y, None, len(x))
  y = np.asarray(y, np.int32)
  n = len(x)
  started, compiled_before = time.perf_counter(), profiling.compiled()
  first = slice(0, min(batch_size, n))
  clean_logits = np.asarray(jax.jit(logits_fn)(jnp.asarray(x[first]))) if n else np.zeros((0, 2))
  if n:
    numerics.check_logits(clean_logits, len(clean_logits))
    numerics.check_labels(y, clean_logits.shape[-1], n)
  checks = []
  if version != "rand":
    checks.append(check_randomized(logits_fn, x[first], y[first]) if n else
                  _check("randomized", None))
  checks.append(check_range_output(clean_logits) if n else _check("range_output", None))
  checks.append({"check": "dynamic", "status": "not run", "message": "no JAX counterpart: a "
                 "jit-compiled forward pass cannot hide autograd calls from the attack."})
  checks.append(check_n_classes(clean_logits.shape[-1], [s[0] for s in steps],
                                {s[0]: s[2] for s in steps}))
  robust = batching.predict(logits_fn, x, batch_size) == y
  constant = False
  if robust.any():
    todo = np.flatnonzero(robust)[:batch_size]
    zero = check_zero_gradients(logits_fn, x[todo], y[todo])
    independence = check_input_independent(
        logits_fn, x[todo], jax.random.fold_in(key, len(steps)), eps, norm,
        zero_gradients=zero["zero_gradient_points"] == len(todo))
    checks += [zero, independence]
    constant = independence["status"] == "warn"
  skip = skip_if_constant and constant
  skipped = {name: "the model's logits do not depend on the input" for name, _, _ in steps
             } if skip else {}
  broken_by = np.where(robust, None, "clean").astype(object)
  robust_after = {"clean": float(robust.mean()) if n else 0.0}
  seconds = {"checks": time.perf_counter() - started}
  compiled = {"checks": profiling.compiled() - compiled_before}
  x_adv = x.copy()
  for index, (name, attack, hparams) in enumerate(steps):
    started, compiled_before = time.perf_counter(), profiling.compiled()
    todo = np.flatnonzero(robust)
    if len(todo) and not skip:
      bar = tqdm.tqdm(total=-(-len(todo) // batch_size), desc=f"autoattack/{name}",
                      disable=not progress, leave=False)
      fn = logits_fn
      if dict(hparams).get("eot_iter", 1) > 1:
        fn = jax.tree_util.Partial(_ignore_key, batching.as_pytree(logits_fn))
      call_hparams = (("norm", norm),) + hparams
      with bar, eval_units.scope(f"{index}-{name}"):  # units of each stage (eval_units)
        candidates = core.run_in_batches(attack, fn, x[todo], y[todo],
                                         key=jax.random.fold_in(key, index),
                                         batch_size=batch_size, eps=eps, hparams=call_hparams,
                                         progress=bar, bucket=True)
      fooled = batching.predict(logits_fn, candidates, batch_size) != y[todo]
      x_adv[todo[fooled]] = candidates[fooled]
      robust[todo[fooled]] = False
      broken_by[todo[fooled]] = name
    robust_after[name] = float(robust.mean()) if n else 0.0
    seconds[name] = time.perf_counter() - started
    compiled[name] = profiling.compiled() - compiled_before
  checks.append(check_square_sr(robust_after))
  breakdown = {"broken_by": broken_by.tolist(), "robust_accuracy_after": robust_after,
               "seconds": seconds,
               "compile_seconds": {k: c.seconds for k, c in compiled.items()},
               "compiled_programs": {k: c.programs for k, c in compiled.items()},
               "hyperparameters": {name: dict(hp) for name, _, hp in steps},
               "version": version, "attacks": [name for name, _, _ in steps],
               "label": label(version, [name for name, _, _ in steps]), "checks": checks,
               "skipped": skipped}
  return x_adv, breakdown


def _ignore_key(logits_fn: LogitsFn, x, key=None):
  """``f(x, key) = logits_fn(x)``: a deterministic model asked for EOT draws (wrapped in a
  Partial over ``logits_fn``, so a bound model's weights stay traced)."""
  del key
  return logits_fn(x)

"""gfa_jax.batching: the one batching path every evaluator uses."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfa_jax import batching


def test_bucketed_batches_pad_only_the_remainder_to_a_bucket_size():
  assert batching.batches(280, 250, bucket=True) == [(0, 250, 250), (250, 280, 32)]
  assert batching.batches(500, 250, bucket=True) == [(0, 250, 250), (250, 500, 250)]
  assert batching.batches(3, 250, bucket=True) == [(0, 3, 3)]
  assert batching.batches(45, 250, bucket=True) == [(0, 45, 48)]
  assert batching.batches(240, 250, bucket=True) == [(0, 240, 250)]  # capped at batch_size
  sizes = [batching.bucket_size(n) for n in range(1, 1025)]
  assert sorted(set(sizes))[:16] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32]
  assert all(n <= s <= 1.25 * n for n, s in zip(range(1, 1025), sizes))
  assert len(set(sizes)) == 8 + 4 * 7  # four sizes a doubling from 8 to 1024
  assert batching.batches(280, 250) == [(0, 250, 250), (250, 280, 250)]
  covered = [i for a, b, _ in batching.batches(1001, 64, bucket=True) for i in range(a, b)]
  assert covered == list(range(1001))
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    batching.batches(10, 0)


def test_map_batches_compiles_one_shape_drops_padding_and_folds_the_batch_index_into_the_key():
  shapes = []

  @jax.jit
  def fn(x, y, key):
    shapes.append(x.shape)  # runs at trace time only
    return {"sum": x.sum(axis=1) + y, "noise": jax.random.uniform(key, x.shape[:1])}

  x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
  y = np.arange(70, dtype=np.float32)
  key = jax.random.key(3)
  out = batching.map_batches(fn, [x, y], 32, key=key)
  chex.assert_shape([out["sum"], out["noise"]], (70,))
  np.testing.assert_array_equal(out["sum"], x.sum(axis=1) + y)
  assert shapes == [(32, 3)]  # the last batch (6 rows) is padded to 32, not compiled again
  second = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (32,)))
  np.testing.assert_array_equal(out["noise"][32:64], second)
  with pytest.raises(ValueError, match="one length"):
    batching.map_batches(fn, [x, y[:5]], 32, key=key)
  assert batching.map_batches(fn, [x[:0], y[:0]], 32, key=key) is None


def test_predict_traces_the_weights_so_a_second_model_compiles_nothing():
  def apply_fn(variables, x):
    return x.reshape(len(x), -1) @ variables["w"]

  x = np.random.default_rng(0).uniform(size=(10, 2, 2, 1)).astype(np.float32)
  w1, w2 = jnp.eye(4)[:, :3], jnp.eye(4)[:, 1:]
  p1 = batching.predict(batching.bind(apply_fn, {"w": w1}), x, 4)
  size = batching._predict_batch._cache_size()
  p2 = batching.predict(batching.bind(apply_fn, {"w": w2}), x, 4)
  assert batching._predict_batch._cache_size() == size
  flat = x.reshape(10, 4)
  np.testing.assert_array_equal(p1, flat[:, :3].argmax(1))
  np.testing.assert_array_equal(p2, flat[:, 1:].argmax(1))


SHARDED_EVAL = """
import json, jax, numpy as np
from gfa_jax import evaluate, models, batching
model = models.create_model("mlp", hidden=(32,))
x = np.random.default_rng(0).uniform(size=(20, 8, 8, 3)).astype(np.float32)
params = models.init_params(model, jax.random.key(0), x.shape[1:])
logits_fn = batching.bind(model.apply, {"params": params})
y = batching.predict(logits_fn, x, 8)  # every point correct clean
masks = {}
for attack, eps in (("pgd", 0.004), ("apgd", 0.004), ("autoattack", 0.004)):
  report = evaluate.evaluate(logits_fn, x, y, attack=attack, eps=[eps], batch_size=8,
                             seed=1, progress=False)
  masks[attack] = report["still_robust"]
print(json.dumps({"devices": jax.local_device_count(), "masks": masks}))
"""


@pytest.mark.slow
def test_two_devices_give_the_masks_of_one_for_pgd_apgd_and_autoattack():
  """Sharded evaluation (each batch split over the local devices) changes no robust mask."""
  from tests.conftest import run_python
  runs = []
  for devices in (1, 2):
    proc = run_python(SHARDED_EVAL, devices=devices)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert [r["devices"] for r in runs] == [1, 2]
  for attack in ("pgd", "apgd", "autoattack"):
    one, two = np.asarray(runs[0]["masks"][attack]), np.asarray(runs[1]["masks"][attack])
    assert 0 < one.sum() < one.size, (attack, one.sum())  # some points robust, some broken
    np.testing.assert_array_equal(one, two, err_msg=attack)

"""Times APGD-CE (100 iterations), PGD-20 and Square (1,000 queries) on SmallCNN test images,
and the standard AutoAttack against the reference's.

    python -m benchmarks.attacks --checkpoint RUN_DIR --data-dir /work/data
    python -m benchmarks.attacks --no-peer       # JAX only (no PyTorch installed)
    python -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
        --checkpoint results/pgd_at/params.msgpack --num-images 1000 --batch 250
    python -m benchmarks.attacks --cases autoattack,reference_autoattack --steps 1 --rounds 1 \
        --model resnet18 --num-images 200 --batch 200      # the reference's own ResNet-18
    python -m benchmarks.attacks --cases forward,forward@ynnpack,torch_forward \
        --model resnet18 --batch 64 --threads 1 --steps 20  # one forward pass, Square's unit

The AutoAttack cases (opt-in, minutes per step) run the whole standard AutoAttack at eps on
the N images: gfa-jax's `autoattack` (compilation included in the step: what a user waits
for; the first step compiles, later steps with the same shapes do not) and the authors'
`pyautoattack` natively in PyTorch, on the same weights (the torch SmallCNN of
benchmarks/torch_peer.py, or the reference's ResNet-18) and the same images
(benchmarks/reference.py). Each reports its robust accuracy and the seconds of every stage.

One step attacks all ``--num-images`` test images, ``--batch`` at a time, with the jitted
gfa_jax attack (compiled before timing, once per batch shape; the peer warms up with a
one-iteration attack on a full batch, so no timed step pays for set-up). With PyTorch installed the
peer's APGD-CE and PGD (benchmarks/torch_peer.py) run interleaved in the same run, on the same
weights and images. Every case also reports the robust accuracy it left, a check that the
peers did the same work. Square stops early once a whole batch is fooled, so its time depends
on the model: time it on a trained one (``--checkpoint``).

The forward cases (opt-in) time one forward pass of the same model on ``--batch`` images, in
gfa-jax (jitted, the importer's model) and in PyTorch (the module the reference attacks, under
``torch.no_grad`` as the reference's Square queries it): Square's cost is these passes, so
their ratio is what separates the two Squares beside the query bookkeeping.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys

import numpy as np

from benchmarks import common


def add_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  p.add_argument("--batch", type=int, default=500, help="images per attack call")
  p.add_argument("--num-images", type=int, default=1000, help="test images attacked per step")
  p.add_argument("--eps", type=float, default=8 / 255, help="Linf radius")
  p.add_argument("--apgd-steps", type=int, default=100)
  p.add_argument("--pgd-steps", type=int, default=20)
  p.add_argument("--square-queries", type=int, default=1000)
  p.add_argument("--checkpoint", default="",
                 help="training workdir or params file of a SmallCNN (default: random init)")
  p.add_argument("--data-dir", default=os.environ.get("GFA_DATA_DIR", ""),
                 help="folder with CIFAR-10 (default $GFA_DATA_DIR; else the embedded subset)")
  p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--model", default="smallcnn", choices=("smallcnn", "resnet18"),
                 help="AutoAttack and forward cases only: the SmallCNN of --checkpoint, or the "
                      "reference's ResNet-18 (pyautoattack/examples/model_test.pt)")
  return p


def model_and_images(args: argparse.Namespace):
  """``(params, images float32 [N, 32, 32, 3] in [0, 1], labels int32 [N], description)``.

  N is ``args.num_images``; a test split with fewer images is repeated (and says so).
  """
  import jax

  from gfa_jax import checkpoints, data, models

  if args.checkpoint:
    _, variables = checkpoints.load_model(args.checkpoint)
    params = variables["params"]
  else:
    params = models.init_params(models.SmallCNN(), jax.random.key(0), data.image_shape("cifar10"))
  dataset = data.load_dataset("cifar10" if args.data_dir else "embedded", args.data_dir or None)
  repeats = -(-args.num_images // len(dataset.test_images))
  take = lambda a: np.concatenate([a] * repeats)[:args.num_images]
  images = data.to_float(take(dataset.test_images))
  description = dataset.description + (f", test images repeated {repeats}x" if repeats > 1 else "")
  return (jax.device_get(params), np.asarray(images, np.float32), take(dataset.test_labels),
          description)


def attack_flops_per_image(name: str, args: argparse.Namespace) -> int:
  """Our FLOP count of one attack on one image (see common.FLOPS_PER_IMAGE)."""
  gradient, forward = common.FLOPS_PER_IMAGE["input_gradient"], common.FLOPS_PER_IMAGE["forward"]
  return {"apgd_ce": (args.apgd_steps + 1) * gradient,  # the start point + each iteration
          "pgd": args.pgd_steps * gradient + forward,  # + the keep-best forward at the end
          "square": args.square_queries * forward}[name]  # at most: it may stop early


def run_in_batches(attack, images, labels, batch):
  """Attacks ``images`` ``batch`` at a time; returns the adversarial images."""
  return np.concatenate([np.asarray(attack(images[i:i + batch], labels[i:i + batch]))
                         for i in range(0, len(images), batch)])


def build_jax_case(name: str, args: argparse.Namespace) -> common.Case:
  import jax

  from gfa_jax import models
  from gfa_jax.attacks.apgd import apgd
  from gfa_jax.attacks.pgd import pgd
  from gfa_jax.attacks.square import square

  params, images, labels, description = model_and_images(args)
  model = models.SmallCNN()
  attack = {
      "apgd_ce": functools.partial(apgd, loss="ce", steps=args.apgd_steps),
      "pgd": functools.partial(pgd, steps=args.pgd_steps),
      "square": functools.partial(square, n_queries=args.square_queries),
  }[name]

  @jax.jit
  def attack_batch(params, x, y, key):
    return attack(functools.partial(model.apply, {"params": params}), x, y, key=key,
                  eps=args.eps)

  @jax.jit
  def correct(params, x, y):
    return (model.apply({"params": params}, x).argmax(-1) == y).sum()

  key = jax.random.key(0)
  params = jax.device_put(params)
  # Compile every batch shape now, so that no timed step compiles.
  sizes = {min(args.batch, len(images) - i) for i in range(0, len(images), args.batch)}
  compiled = {n: attack_batch.lower(params, images[:n], labels[:n], key).compile() for n in sizes}
  last = {}

  def step():
    last["x_adv"] = run_in_batches(lambda x, y: compiled[len(x)](params, x, y, key), images,
                                   labels, args.batch)

  def outcome():
    robust = int(correct(params, last["x_adv"], labels))
    return {"robust_accuracy": robust / len(images),
            "clean_accuracy": int(correct(params, images, labels)) / len(images)}

  return common.Case(step, len(images), attack_flops_per_image(name, args) * len(images),
                     {"framework": "jax", "images": description}, outcome)


def reference_model_name(args: argparse.Namespace) -> str:
  """The model of the cases run on both sides: 'resnet18' or the SmallCNN's checkpoint."""
  model = "resnet18" if args.model == "resnet18" else args.checkpoint
  if not model:
    raise ValueError("the AutoAttack and forward cases need --checkpoint (a SmallCNN) or "
                     "--model resnet18")
  return model


def build_forward_case(impl: str, args: argparse.Namespace) -> common.Case:
  """One step: the logits of ``--batch`` test images, by gfa-jax (jitted) or by PyTorch."""
  from benchmarks import reference

  _, x, _, description = model_and_images(args)
  x, model = x[:args.batch], reference_model_name(args)
  if impl == "gfa-jax":
    import jax
    apply_fn, variables = reference.ours_model(model)
    forward = jax.jit(apply_fn).lower(variables, x).compile()
    x = jax.device_put(x)
    step = lambda: forward(variables, x).block_until_ready()
  else:
    import torch
    torch.set_num_threads(args.threads)
    device = common.torch_device(args)
    sync = common.torch_synchronizer(device)
    net = reference.reference_model(model)[0].to(device)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)

    def step():
      with torch.no_grad():
        net(xt)
      sync()

    step()  # the first call sets oneDNN's kernels up: not a step's cost
  return common.Case(step, len(x), None, {"framework": impl, "model": model,
                                          "images": description})


def build_autoattack_case(impl: str, args: argparse.Namespace) -> common.Case:
  """One step: the standard AutoAttack on the N images, by gfa-jax or by the reference."""
  from benchmarks import reference

  _, x, y, description = model_and_images(args)
  model = reference_model_name(args)
  last = {}
  if impl == "gfa-jax":
    apply_fn, variables = reference.ours_model(model)
    run = lambda: reference.run_ours("autoattack", apply_fn, variables, x, y, args.eps, "linf",
                                     0, args.batch)
  else:
    import torch
    torch.set_num_threads(args.threads)
    device = common.torch_device(args)  # the reference on the GPU where PyTorch sees one
    net = reference.reference_model(model)[0].to(device)
    run = lambda: reference.run_reference("autoattack", net, x, y, args.eps, "linf", 0,
                                          args.batch, device=str(device))

  def step():
    last.update(run())

  def outcome():
    rounded = lambda seconds: {k: round(v, 2) for k, v in seconds.items()}
    record = {"robust_accuracy": float(last["mask"].mean()),
              "stage_seconds": rounded(last["stage_seconds"])}
    if last.get("compile_seconds"):  # ours only: the eager reference compiles nothing
      record["stage_compile_seconds"] = rounded(last["compile_seconds"])
    return record

  return common.Case(step, len(x), None, {"framework": impl, "model": model, "images": description},
                     outcome)


CASES = {name: functools.partial(build_jax_case, name) for name in ("apgd_ce", "pgd", "square")}
DEFAULT_CASES = tuple(CASES)
CASES.update({"autoattack": functools.partial(build_autoattack_case, "gfa-jax"),
              "reference_autoattack": functools.partial(build_autoattack_case, "reference"),
              "forward": functools.partial(build_forward_case, "gfa-jax"),
              "torch_forward": functools.partial(build_forward_case, "torch")})


def main(argv: list[str]) -> None:
  args = add_flags(common.parser(__doc__.splitlines()[0], steps=2, warmup=0, rounds=2)
                   ).parse_args(argv)
  extra = []
  args.cases = args.cases or ",".join(DEFAULT_CASES)  # the others are opt-in
  peers = any(common.split_variant(c.strip())[0] in DEFAULT_CASES for c in args.cases.split(","))
  if not args.worker and not args.no_peer and peers:
    if importlib.util.find_spec("torch") is None:
      print("PyTorch not installed: timing the JAX attacks only", file=sys.stderr)
    else:
      extra = [("benchmarks.torch_peer", n) for n in ("torch_apgd_ce", "torch_pgd")]
  results = common.main("benchmarks.attacks", CASES, args, extra)
  by = {r["name"]: r for r in results}
  ratios = {f"{n}_jax_over_torch_images_per_s": round(
      by[n]["images_per_s"] / by[f"torch_{n}"]["images_per_s"], 3)
      for n in ("apgd_ce", "pgd") if n in by and f"torch_{n}" in by}
  for ours, theirs, key in (("autoattack", "reference_autoattack", "reference"),
                            ("forward", "torch_forward", "torch")):
    if ours in by and theirs in by:  # both timed in this one run
      ratios[f"{ours}_jax_over_{key}_seconds"] = round(
          by[ours]["ms_per_step"] / by[theirs]["ms_per_step"], 3)
  ratios.update(common.variant_ratios(results))
  if ratios:
    print(json.dumps({"name": "summary", **ratios}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

"""Removes this machine's absolute paths from committed artefacts (issue 16).

  python scripts/scrub_paths.py [ROOT ...]         # default: results/
  python scripts/scrub_paths.py --check            # exit 1 listing files that still hold one

JSON files: a config's `data_dir` becomes "", and any other string holding an absolute path
under /work/, /tmp/, /root/ or /home/ keeps only the path's last component ("CIFAR-10 (official
binary layout, /work/data/cifar-10-batches-bin)" -> "... cifar-10-batches-bin)"). Params-only
checkpoints (*.msgpack from checkpoints.export_params): the same for their config and metadata,
parameters untouched. Files are rewritten atomically, and only if something changed.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import flax.serialization

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gfa_jax.reporting import write_atomically  # noqa: E402

PATH = re.compile(r"/(?:work|tmp|root|home)/[^\s\"',)]*")


def scrub(value):
  """`value` (any JSON value) with data_dir blanked and absolute paths cut to their last part."""
  if isinstance(value, dict):
    return {k: ("" if k == "data_dir" and isinstance(v, str) else scrub(v)) for k, v in value.items()}
  if isinstance(value, list):
    return [scrub(v) for v in value]
  if isinstance(value, str):
    return PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], value)
  return value


def scrub_file(path: Path) -> bool:
  """Rewrites `path` if it holds a path; returns whether it did."""
  if path.suffix == ".json":
    text = path.read_text()
    data = json.loads(text)
    clean = scrub(data)
    if clean == data:
      return False
    indent = 2 if text.lstrip().startswith("{\n") else None
    write_atomically(path, json.dumps(clean, indent=indent).encode())
    return True
  payload = flax.serialization.msgpack_restore(path.read_bytes())
  changed = False
  for key in ("config", "metadata"):
    if isinstance(payload.get(key), str):
      clean = json.dumps(scrub(json.loads(payload[key])))
      changed |= clean != payload[key]
      payload[key] = clean
  if changed:
    write_atomically(path, flax.serialization.msgpack_serialize(payload))
  return changed


def files(roots):
  for root in roots:
    for path in sorted(Path(root).rglob("*")):
      if path.suffix in (".json", ".msgpack") and path.is_file():
        yield path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("roots", nargs="*", default=[str(ROOT / "results")])
  parser.add_argument("--check", action="store_true", help="only list files holding a path")
  args = parser.parse_args()
  dirty = [p for p in files(args.roots) if PATH.search(p.read_bytes().decode("latin-1"))]
  if args.check:
    for p in dirty:
      print(p)
    raise SystemExit(1 if dirty else 0)
  for p in dirty:
    print(f"{'scrubbed' if scrub_file(p) else 'unchanged (path not in a JSON string)'}: {p}")


if __name__ == "__main__":
  main()

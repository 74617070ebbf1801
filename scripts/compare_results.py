"""Compares the numbers of two evaluation JSONs (or two folders of them), ignoring timings
and provenance: the check of "no behaviour change" refactors (issue 17).

  python scripts/compare_results.py BEFORE AFTER     # files or folders; exit 1 on a difference
"""

import json
import sys
from pathlib import Path

# Wall times, the commit and where the checkpoint came from differ between any two runs.
IGNORED = {"elapsed_seconds", "seconds", "stage_seconds", "stage_compile_seconds", "git_commit",
           "checkpoint", "files", "subset_file", "data", "eps_text"}


def differences(a, b, path="") -> list[str]:
  """Every leaf where a and b differ (keys in IGNORED skipped), as 'path: a != b'."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      if key in IGNORED:
        continue
      if key not in a or key not in b:
        out.append(f"{path}/{key}: only in {'after' if key in b else 'before'}")
      else:
        out += differences(a[key], b[key], f"{path}/{key}")
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
  return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def main(before: str, after: str) -> int:
  pairs = [(Path(before), Path(after))]
  if pairs[0][0].is_dir():
    pairs = [(f, Path(after) / f.relative_to(before)) for f in sorted(Path(before).rglob("*.json"))]
  failed = 0
  for x, y in pairs:
    found = differences(json.loads(x.read_text()), json.loads(y.read_text()))
    print(f"{x.name}: {'identical numbers' if not found else f'{len(found)} difference(s)'}")
    for line in found[:10]:
      print(f"  {line}")
    failed += bool(found)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))

#!/usr/bin/env python
"""Record the golden outputs of tests/test_golden.py (tests/golden/golden.npz) from the current code.

Run only when a change of behaviour is intended (and say so in the commit): the golden file is the proof that a
refactor kept behaviour. Usage: ``python tools/record_golden.py [--check]`` (``--check`` compares instead of
writing and prints the cases that differ)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import golden_cases as gc  # noqa: E402


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    data: dict[str, np.ndarray] = {}
    for cid, key, opts in gc.cases():
        for k, v in gc.run_case(key, opts).items():
            data[f"{cid}|{k}"] = v
    if args.check:
        old = np.load(gc.GOLDEN)
        bad = sorted({k.split("|")[0] for k in data if k not in old or not _same(old[k], data[k])})
        print(f"{len(bad)} of {len(gc.cases())} cases differ" + "".join(f"\n  {b}" for b in bad))
        return 1 if bad else 0
    gc.GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(gc.GOLDEN, **data)
    print(f"wrote {gc.GOLDEN} ({len(gc.cases())} cases, {gc.GOLDEN.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

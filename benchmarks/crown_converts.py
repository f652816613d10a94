"""Whether every network of the shared VNN-COMP 2021 families converts with CROWN (issue 12's last criterion).

Runs `graphcert convert MODEL --method crown -o OUT` on every .onnx (or .onnx.gz) under each family folder,
one process at a time, and prints per family converted / refused / crashed with each refusal's first line.

    python benchmarks/crown_converts.py [--root ../shared/benchmarks/vnncomp2021] [--method crown] [--timeout 600]
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def networks(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith((".onnx", ".onnx.gz")))


def convert(path: Path, method: str, timeout: float, folder: str) -> tuple[str, str, float]:
    model = path
    if path.name.endswith(".gz"):
        model = Path(folder) / path.name[:-3]
        with gzip.open(path, "rb") as src, open(model, "wb") as dst:
            shutil.copyfileobj(src, dst)
    out = Path(folder) / "bound.onnx"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "cli.py"), "convert", str(model), "--method", method,
                               "-o", str(out)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return "crashed", f"timeout after {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    message = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    if proc.returncode == 0 and out.exists():
        return "converted", "", seconds
    # a typed one-line error exits non-zero with no traceback
    kind = "crashed" if "Traceback" in proc.stderr else "refused"
    return kind, message, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE.parent / "shared" / "benchmarks" / "vnncomp2021"))
    parser.add_argument("--method", default="crown")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    root = Path(args.root)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    with tempfile.TemporaryDirectory() as folder:
        for path in networks(root):
            family = path.relative_to(root).parts[0]
            kind, message, seconds = convert(path, args.method, args.timeout, folder)
            counts[family][kind] += 1
            print(f"{kind:9} {seconds:6.1f} s  {path.relative_to(root)}  {message}", flush=True)
    print(f"\n{'family':16} converted refused crashed   (method {args.method})")
    for family, found in sorted(counts.items()):
        print(f"{family:16} {found['converted']:9} {found['refused']:7} {found['crashed']:7}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("converted", "refused", "crashed")}
    print(f"{'all':16} {total['converted']:9} {total['refused']:7} {total['crashed']:7}")


if __name__ == "__main__":
    main()

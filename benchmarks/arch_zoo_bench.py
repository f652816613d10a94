"""Real architectures (tests/arch_zoo.py, random weights): per architecture, exporter and method, the convert
time (load + build the bound graph), the bound graph's onnxruntime time against the model's at one batch, and
the mean bound width at a small radius. A method that refuses the model is listed with the op it refuses.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/arch_zoo_bench.py [--batch 32] [--eps 1e-3] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import arch_zoo  # noqa: E402
from graphcert import api  # noqa: E402
from graphcert import model as model_lib  # noqa: E402
from graphcert.errors import GraphcertError, UnsupportedOpError  # noqa: E402
from graphcert.runtime import Session  # noqa: E402

METHODS = ("ibp", "crown-ibp", "crown")
EXPORTERS = (("dynamo", None), ("torchscript", 17))


def timed(run, repeat: int) -> float:
    run()  # warm-up
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", help="comma-separated architecture names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(arch_zoo.ARCHITECTURES)
    print(f"| architecture | exporter | method | convert s | bound graph / model time (batch {args.batch}) | "
          f"mean width at eps {args.eps:g} |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            _, shape = arch_zoo.build(name)
            x = arch_zoo.sample_input(shape, n=args.batch, seed=0)
            for exporter, opset in EXPORTERS:
                path = arch_zoo.export(name, folder, exporter, opset)
                tag = f"{exporter}{opset or ''}"
                start = time.perf_counter()
                loaded = model_lib.load(path)
                load_seconds = time.perf_counter() - start
                model = Session(api.to_proto(loaded), threads=1)
                fixed = model_lib.batch_note(loaded)
                feed = {model.input_names[0]: x[:1] if fixed else x}
                if fixed:
                    print(f"| {name} | {tag} | (all) | batch stays 1: {fixed[:60]} | | |")
                model_seconds = timed(lambda: model.run(feed), args.repeat)
                for method in METHODS:
                    start = time.perf_counter()
                    try:
                        bound = api.to_proto(api.bound_graph(loaded, method))
                    except UnsupportedOpError as refusal:
                        print(f"| {name} | {tag} | {method} | refused: {', '.join(sorted(refusal.nodes_by_op))} "
                              f"| | |")
                        continue
                    except GraphcertError as refusal:
                        print(f"| {name} | {tag} | {method} | refused: {str(refusal)[:80]} | | |")
                        continue
                    convert_seconds = load_seconds + time.perf_counter() - start
                    session = Session(bound, threads=1)
                    bound_feed = {**feed, "epsilon": np.float32(args.eps)}
                    bound_seconds = timed(lambda: session.run(bound_feed), args.repeat)
                    output = loaded.graph.outputs[0].name
                    out = session.run(bound_feed, [f"{output}_lower", f"{output}_upper"])
                    width = float(np.mean(out[f"{output}_upper"] - out[f"{output}_lower"]))
                    print(f"| {name} | {tag} | {method} | {convert_seconds:.2f} | "
                          f"{bound_seconds / model_seconds:.1f}x | {width:.3g} |", flush=True)


if __name__ == "__main__":
    main()

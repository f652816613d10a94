"""Certified-accuracy curves of the shipped models, per-sample radius statistics, the cost of certificate graphs
in onnxruntime, and a sweep against certifying each radius separately.

    python benchmarks/certs_bench.py --limit 200 --radius-limit 100 --sweep-limit 100 \
        --plot benchmarks/certified_curves.png

Prints Markdown tables (the "Certificates and curves" section of benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphcert  # noqa: E402
from graphcert.certify import certify  # noqa: E402
from graphcert.data import load_dataset  # noqa: E402
from graphcert.export import to_proto  # noqa: E402
from graphcert.models import shipped_path  # noqa: E402
from graphcert.passes.certificate import certificate_graph  # noqa: E402
from graphcert.sweep import parse_eps, sweep  # noqa: E402

# The norm each shipped model is trained and documented for (README), and the methods that bound it.
SHIPPED = (("mnist_mlp", "linf"), ("mnist_cnn", "linf"), ("mnist_mlp_gloro", "l2"), ("mnist_cnn_gloro", "l2"),
           ("mnist_lipmlp", "l2"))
METHODS = {"linf": ["ibp", "crown-ibp", "crown"], "l2": ["lipschitz", "crown-ibp", "crown"]}
EPS = {"linf": "0:0.05:0.005", "l2": "0:1:0.1"}


def curves(data, limit, radius_limit, plot):
    results = []
    print(f"\n### Certified accuracy curves ({limit} test images; radius statistics on the first {radius_limit})\n")
    print("| model | norm | method | " + " | ".join(f"ε={e:g}" for e in parse_eps(EPS['linf'])[::2]) + " | seconds |")
    print("|---|---|---|" + "---|" * (len(parse_eps(EPS['linf'])[::2]) + 1))
    for name, norm in SHIPPED:
        eps = parse_eps(EPS[norm])
        result = sweep(shipped_path(name), data, eps, METHODS[norm], limit=limit, norm=norm, model_name=name)
        results.append(result)
        for row_method in result.methods:
            shares = result.certified[row_method].mean(axis=0)
            seconds = result.build_seconds[row_method] + float(result.seconds[row_method].sum())
            print(f"| {name} | {norm} | {row_method} | " + " | ".join(f"{s:.1%}" for s in shares[::2])
                  + f" | {seconds:.1f} |")
    print("\n(L2 columns are ε = 0, 0.2, 0.4, 0.6, 0.8, 1.0; clean accuracy is the ε = 0 column.)\n")
    print("| model | method | median radius | 10 % | 25 % | 75 % | 90 % | max | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, norm in SHIPPED:
        result = sweep(shipped_path(name), data, parse_eps(EPS[norm])[1:2], METHODS[norm], limit=radius_limit,
                       norm=norm, radius=True, tolerance=1e-4, model_name=name)
        for method, s in result.radius_stats().items():
            q = s["quantiles"]
            print(f"| {name} ({norm}) | {method} | {s['median']:.4g} | {q['0.1']:.4g} | {q['0.25']:.4g} | "
                  f"{q['0.75']:.4g} | {q['0.9']:.4g} | {s['max']:.4g} | {s['seconds']:.1f} |")
    if plot:
        figure(results, plot)


def figure(results, path):
    from graphcert.plots import _pyplot, figure_bytes
    from graphcert.files import atomic_write
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3.2), sharey=True)
    for ax, result in zip(axes, results):
        for method in result.methods:
            ax.plot(result.eps, result.certified[method].mean(axis=0) * 100, marker="o", markersize=3, label=method)
        ax.axhline(result.clean / result.n * 100, color="0.4", linestyle="--", linewidth=1, label="clean")
        ax.set_title(f"{result.model}", fontsize="small")
        ax.set_xlabel(("L∞" if result.norm == "linf" else "L2") + " radius ε", fontsize="small")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower left")
    axes[0].set_ylabel("certified accuracy (%)")
    atomic_write(figure_bytes(fig, "png", dpi=80), path)
    print(f"\nwrote {path} ({os.path.getsize(path) // 1024} KB)")


def certificate_cost(data, batch, repeats):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    print(f"\n### Certificate graphs against the plain model (onnxruntime, 1 thread, batch up to {batch}, best of "
          f"{repeats})\n")
    print("| model | method | batch | rungs | plain ms | certificate ms | ratio | certified (radius > 0) |")
    print("|---|---|---|---|---|---|---|---|")
    from graphcert.certify import COEFFICIENT_BYTES, samples_per_run
    for name, method, norm, domain in (("mnist_mlp", "ibp", "linf", (0.0, 1.0)), ("mnist_mlp", "crown", "linf", (0.0, 1.0)),
                                       ("mnist_cnn", "ibp", "linf", (0.0, 1.0)), ("mnist_cnn", "crown", "linf", (0.0, 1.0)),
                                       ("mnist_lipmlp", "lipschitz", "l2", None), ("mnist_cnn_gloro", "lipschitz", "l2", None)):
        path = shipped_path(name)
        # CROWN holds coefficient matrices per input and rung: keep the batch within about 1 GB
        per_run = samples_per_run(graphcert.load(path), method)
        inputs = batch if per_run is None else max(1, min(batch, per_run // 2 // 8))
        x = data.x[:inputs]
        plain = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        proto = to_proto(certificate_graph(graphcert.load(path), method, domain, norm))
        cert = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        times = []
        for session in (plain, cert):
            session.run(None, {"image": x})
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                out = session.run(None, {"image": x})
                best = min(best, time.perf_counter() - start)
            times.append(best)
        rungs = "0, 1 (closed form)" if method == "lipschitz" else "8 (default ladder)"
        print(f"| {name} | {method} | {inputs} | {rungs} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.1f} | "
              f"{times[1] / times[0]:.0f}× | {(out[2] > 0).mean():.1%} |")


def sweep_against_separate(data, limit):
    print(f"\n### A sweep against certifying each radius separately ({limit} images, same process)\n")
    print("| model | method | radii | separate runs s | sweep s | ratio | same counts |")
    print("|---|---|---|---|---|---|---|")
    for name, method, norm in (("mnist_mlp", "crown", "linf"), ("mnist_cnn", "crown", "linf"),
                               ("mnist_lipmlp", "lipschitz", "l2")):
        eps = parse_eps(EPS[norm])[1:]
        path = shipped_path(name)
        start = time.perf_counter()
        separate = [certify(path, data, e, method=method, limit=limit, norm=norm).certified for e in eps]
        separate_s = time.perf_counter() - start
        start = time.perf_counter()
        result = sweep(path, data, eps, [method], limit=limit, norm=norm)
        sweep_s = time.perf_counter() - start
        same = separate == [r.certified for r in result.rows()]
        print(f"| {name} | {method} | {len(eps)} | {separate_s:.1f} | {sweep_s:.1f} | {separate_s / sweep_s:.1f}× | "
              f"{'yes' if same else 'no: ' + str(separate) + ' vs ' + str([r.certified for r in result.rows()])} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--radius-limit", type=int, default=100)
    parser.add_argument("--sweep-limit", type=int, default=100)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="curves,certificate,sweep")
    args = parser.parse_args()
    data = load_dataset("mnist-test")
    parts = args.only.split(",")
    if "curves" in parts:
        curves(data, args.limit, args.radius_limit, args.plot)
    if "certificate" in parts:
        certificate_cost(data, args.batch, args.repeats)
    if "sweep" in parts:
        sweep_against_separate(data, args.sweep_limit)


if __name__ == "__main__":
    main()

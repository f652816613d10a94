"""Branch and bound over Sigmoid/Tanh units on small random networks whose true maximum is known.

Each network maps [-1, 1]^2 to 2 outputs through hidden layers of one S-shaped activation (weights N(0, 1)
times `--scale` over sqrt(fan-in)); the maximum of y_0 comes from a 601 x 601 grid (plus its steepest step,
an upper estimate of what lies between grid points). The property "y_0 >= t" is unsafe-set notation, so
`holds` means y_0 < t everywhere: with t a fraction of the way from the maximum to CROWN's upper bound it
holds and CROWN alone cannot tell; just below the maximum it is violated and must never be `holds`.

    python benchmarks/general_bab_bench.py --seeds 0 1 2 3 --timeout 20 [--set BETA_OFF_ZERO=False]

`--set NAME=VALUE` sets a constant of graphcert.verify.relu_bab (or of the module named NAME's prefix,
e.g. bounds.X) for an A/B comparison in one checkout. Prints one line per property and the totals.
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CURVES = {"Sigmoid": lambda v: 0.5 * (1.0 + np.tanh(0.5 * v)), "Tanh": np.tanh}


def network(widths: list[int], activation: str, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    layers = [((rng.normal(size=(a, b)) * scale / np.sqrt(a)).astype(np.float32),
               (rng.normal(size=b) * 0.3 * scale).astype(np.float32)) for a, b in zip(widths[:-1], widths[1:])]
    nodes, inits, x = [], [], "x"
    for k, (w, bias) in enumerate(layers):
        inits += [onnx.numpy_helper.from_array(w, f"w{k}"), onnx.numpy_helper.from_array(bias, f"b{k}")]
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"z{k}"])]
        x = f"z{k}"
        if k < len(layers) - 1:
            nodes.append(helper.make_node(activation, [x], [f"a{k}"]))
            x = f"a{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), layers


def forward(layers, activation: str, x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for k, (w, bias) in enumerate(layers):
        h = h @ w + bias
        if k < len(layers) - 1:
            h = CURVES[activation](h)
    return h


def crown_upper(proto) -> float:
    from graphcert.export import to_proto
    from graphcert.interface import InputSet
    from graphcert.model import load
    from graphcert.passes.crown import CrownPass
    from graphcert.runtime import Session
    session = Session(to_proto(CrownPass(InputSet("box"))(load(proto)).model))
    box = {"x_lower": -np.ones((1, 2), np.float32), "x_upper": np.ones((1, 2), np.float32)}
    return float(session.run(box)["y_upper"][0, 0])


def write_property(path: pathlib.Path, threshold: float) -> None:
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    text += "".join(f"(assert (>= X_{i} -1))\n(assert (<= X_{i} 1))\n" for i in range(2))
    path.write_text(text + f"(assert (>= Y_0 {float(threshold)!r}))\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--activations", nargs="+", default=["Sigmoid", "Tanh"])
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 24, 24, 24, 2])
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE: a relu_bab constant")
    args = parser.parse_args(argv)
    import torch

    from graphcert.verify import relu_bab, verify
    torch.set_num_threads(1)
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        setattr(relu_bab, name, ast.literal_eval(value))
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 601), np.linspace(-1, 1, 601)), -1).reshape(-1, 2)
    decided = unsound = 0
    total = 0.0
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        model, spec = pathlib.Path(tmp) / "m.onnx", pathlib.Path(tmp) / "p.vnnlib"
        for activation in args.activations:
            for seed in args.seeds:
                proto, layers = network(args.widths, activation, seed, args.scale)
                onnx.save(proto, model)
                outputs = forward(layers, activation, grid)[:, 0]
                top = float(outputs.max())
                steepest = max(np.abs(np.diff(outputs.reshape(601, 601), axis=a)).max() for a in (0, 1))
                bound = crown_upper(proto)
                cases = [(f, top + steepest + f * (bound - top - steepest), "holds") for f in args.fractions]
                cases.append((-1.0, top - 1e-3, "violated"))
                for fraction, threshold, truth in cases:
                    write_property(spec, threshold)
                    began = time.monotonic()
                    result = verify(model, spec, timeout=args.timeout, method="crown", branching="relus",
                                    rounding="real")
                    seconds = time.monotonic() - began
                    ok = result.status == truth
                    decided += ok
                    unsound += result.status == "holds" and truth == "violated"
                    total += seconds if ok else args.timeout
                    count += 1
                    print(f"{activation:7s} seed {seed} t={'max-1e-3' if fraction < 0 else f'{fraction:.0%} to CROWN':>13s} "
                          f"(gap {bound - top:7.3f}): {result.status:8s} {seconds:6.1f} s {result.boxes:6d} bounds "
                          f"{'' if ok else result.reason[:90]}", flush=True)
    print(f"decided {decided} / {count}, seconds (undecided at the timeout) {total:.1f}, unsound {unsound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Width of IBP and CROWN bounds on unrolled recurrent classifiers (graphcert.unroll), by sequence length.

A single LSTM or GRU layer (batch first, layout 1, so the batch stays on axis 0), random weights uniform in
±1/sqrt(hidden) as torch initialises them, its last hidden state read by a dense head; the mean logit width over
8 random inputs at several radii, and the time to build each bound graph.

    python benchmarks/recurrent_widths.py [--ops LSTM,GRU] [--seq 8,28] [--methods ibp,crown] [--hidden 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphcert import api
from graphcert import model as model_lib
from graphcert.runtime import Session

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def classifier(op: str, seq: int, inputs: int, hidden: int, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    k, g = 1 / np.sqrt(hidden), GATES[op]

    def init(name, shape):
        return onnx.numpy_helper.from_array(rng.uniform(-k, k, shape).astype(np.float32), name)
    nodes = [helper.make_node(op, ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden, layout=1),
             helper.make_node("Flatten", ["Y_h"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "recurrent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])],
        [init("W", (1, g * hidden, inputs)), init("R", (1, g * hidden, hidden)), init("B", (1, 2 * g * hidden)),
         init("head_w", (classes, hidden)), init("head_b", (classes,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="LSTM,GRU")
    parser.add_argument("--seq", default="8,28")
    parser.add_argument("--methods", default="ibp,crown")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--eps", default="1e-4,1e-3,1e-2")
    args = parser.parse_args()
    for op in args.ops.split(","):
        for seq in map(int, args.seq.split(",")):
            start = time.perf_counter()
            loaded = model_lib.load(classifier(op, seq, 28, args.hidden))
            load_s = time.perf_counter() - start
            x = np.random.default_rng(1).uniform(-1, 1, (8, seq, 28)).astype(np.float32)
            for method in args.methods.split(","):
                start = time.perf_counter()
                session = Session(api.to_proto(api.bound_graph(loaded, method)))
                build_s = time.perf_counter() - start
                widths = []
                for eps in map(float, args.eps.split(",")):
                    out = session.run({"x": x, "epsilon": np.float32(eps)})
                    widths.append(f"eps {eps:g}: {float((out['y_upper'] - out['y_lower']).mean()):.4g}")
                print(f"{op} seq {seq} hidden {args.hidden} {method}: {'; '.join(widths)} "
                      f"(load {load_s:.1f} s, bound graph {build_s:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

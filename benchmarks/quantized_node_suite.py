"""ONNX's node tests of the quantized integer ops (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger,
DynamicQuantizeLinear) through graphcert's IBP and CROWN.

Most of these tests feed integer tensors, so the float node suite (benchmarks/onnx_node_suite.py) leaves them
out: there is no float input to perturb. Here the first input (the quantized data) is fed as a float that a
QuantizeLinear (scale 1, zero point 0, the input's own type) turns into the test's integers, as a deployed
quantized model receives its input; that float input is perturbed, every other input (weights, scales, zero
points, bias) is fed as given (a graph input, not a constant). Float-input tests (DynamicQuantizeLinear) run as
they are. Each test and method lands in one class:

  sound      at eps = 0 the bounds hold the test's expected outputs; at eps = 1.5 (one or two integer steps of
             the quantized input) every sampled and corner point's output (onnxruntime on the model) is inside;
  UNSOUND    one of those checks fails;  refused  a one-line graphcert error;  crashed  anything else.

    python benchmarks/quantized_node_suite.py [--only REGEX] [--methods ibp,crown]

With --zoo, the convolutional architectures of tests/arch_zoo.py (TorchScript export, opset 17) are quantized by
onnxruntime's `quantize_static` in QOperator format (uint8 activations, int8 weights, 4 calibration inputs) and
each method's bound graph goes through the soundness harness at eps 0.01 (random, corner and attacked points).

    python benchmarks/quantized_node_suite.py --zoo [--only REGEX]
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_node_suite import _array, _one_line, collect  # noqa: E402

PATTERN = r"qlinearconv|qlinearmatmul|convinteger|matmulinteger|dynamicquantizelinear"
EPSILON = 1.5
POINTS = 64
INTEGER_TYPES = {2: np.uint8, 3: np.int8}


def wrapped(case):
    """(model, feeds, perturbed input, expected outputs) with the first integer input fed as a float."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    given, expected = case.data_sets[0]
    given = [np.asarray(_array(x)) for x in given]
    graph = model.graph
    first = graph.input[0]
    elem = first.type.tensor_type.elem_type
    feeds = {i.name: x for i, x in zip(graph.input, given)}
    if elem not in INTEGER_TYPES:
        return model, feeds, first.name, expected
    original, name = first.name, first.name + "_float"
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim]
    graph.initializer.extend([numpy_helper.from_array(np.float32(1.0), name + "_scale"),
                              numpy_helper.from_array(np.zeros((), INTEGER_TYPES[elem]), name + "_zero")])
    graph.node.insert(0, helper.make_node("QuantizeLinear", [name, name + "_scale", name + "_zero"], [original]))
    graph.input[0].CopyFrom(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    feeds[name] = feeds.pop(original).astype(np.float32)
    return model, feeds, name, expected


def run(case, method: str) -> dict:
    from graphcert import api
    from graphcert.errors import GraphcertError
    from graphcert.export import to_proto
    from graphcert.interface import fix_inputs
    from graphcert.runtime import Session
    model, feeds, perturbed, expected = wrapped(case)
    try:
        bound = to_proto(api.bound_graph(fix_inputs(api.load(model), [perturbed]), method))
    except GraphcertError as exc:
        return {"status": "refused", "detail": _one_line(exc)}
    except Exception as exc:
        return {"status": "crashed", "detail": _one_line(exc)}
    try:
        if _runs(model, feeds):
            session, original = Session(bound), Session(model)
        else:  # onnxruntime lacks the kernel (ConvInteger's per-channel zero point): onnx's reference evaluator
            session, original = _Reference(bound), _Reference(model)
        outputs = [o.name for o in model.graph.output]
        eps_name = next(i.name for i in bound.graph.input if i.name.endswith("epsilon"))

        def bounds(eps):
            got = session.run({**feeds, eps_name: np.float32(eps)})
            return {o: (got[f"{o}_lower"], got[f"{o}_upper"]) for o in outputs if f"{o}_lower" in got}
        for out, value in zip(outputs, expected):
            lower, upper = bounds(0.0)[out]
            value = np.asarray(_array(value)).astype(np.float64)
            if not (np.all(lower <= value + 1e-5) and np.all(value - 1e-5 <= upper)):
                return {"status": "UNSOUND", "detail": f"{out} at eps=0"}
        box = bounds(EPSILON)
        rng = np.random.default_rng(0)
        x = feeds[perturbed]
        for k in range(POINTS):
            offset = rng.uniform(-EPSILON, EPSILON, x.shape) if k % 2 else rng.choice([-EPSILON, EPSILON], x.shape)
            values = original.run({**feeds, perturbed: (x + offset).astype(np.float32)})
            for out, (lower, upper) in box.items():
                value = np.asarray(values[out]).astype(np.float64)
                tolerance = 1e-5 + 1e-5 * np.abs(value)
                if not (np.all(lower - tolerance <= value) and np.all(value <= upper + tolerance)):
                    return {"status": "UNSOUND", "detail": f"{out} at a sampled point"}
        width = np.mean([np.mean(np.asarray(u, np.float64) - np.asarray(lo, np.float64)) for lo, u in box.values()])
        return {"status": "sound", "detail": f"mean width at eps={EPSILON}: {width:.3g}"}
    except Exception as exc:
        return {"status": "crashed", "detail": "bound graph: " + _one_line(exc)}


def _runs(model, feeds) -> bool:
    from graphcert.runtime import Session
    try:
        Session(model).run(feeds)
        return True
    except Exception:
        return False


class _Reference:
    def __init__(self, proto):
        from onnx.reference import ReferenceEvaluator
        self.evaluator = ReferenceEvaluator(proto)
        self.inputs = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}

    def run(self, feeds):
        from onnx import helper
        feeds = {k: np.asarray(v, helper.tensor_dtype_to_np_dtype(self.inputs[k])) for k, v in feeds.items()
                 if k in self.inputs}
        return dict(zip(self.evaluator.output_names, self.evaluator.run(None, feeds)))


ZOO = ["residual_cnn", "resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "densenet", "unet"]


def zoo(names, methods, folder) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import arch_zoo
    import onnx
    from harness import check_bounds_sound, graph_bound_fn
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from graphcert import api
    from graphcert.interface import InputSet
    for name in names:
        path = arch_zoo.export(name, folder, "torchscript", 17)
        _, shape = arch_zoo.build(name)
        source = onnx.load(path).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{source: arch_zoo.sample_input(shape, seed=k)} for k in range(4)])

            def get_next(self):
                return next(self.feeds, None)
        out = os.path.join(folder, f"{name}-qoperator.onnx")
        quantize_static(path, out, Reader(), quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        ops = sorted({(f"{n.domain}:" if n.domain else "") + n.op_type for n in onnx.load(out).graph.node
                      if n.op_type.startswith("Q") or n.domain})
        print(f"{name}: {', '.join(ops)}", flush=True)
        loaded = api.load(out)
        for method in methods:
            try:
                bound = api.to_proto(api.bound_graph(loaded, method, InputSet("linf")))
            except Exception as exc:
                print(f"  {method:6s} refused  {_one_line(exc)}", flush=True)
                continue
            report = check_bounds_sound(api.to_proto(loaded), graph_bound_fn(bound, loaded.graph.inputs[0].name,
                                        loaded.graph.outputs[0].name), arch_zoo.sample_input(shape, seed=3), 0.01,
                                        n_random=6, corners=6, pgd_steps=2, attack_targets=3)
            print(f"  {method:6s} {'sound' if report.sound else 'UNSOUND'}  max excess {report.max_violation:.3g} "
                  f"({report.points} points, {report.gradients} gradients)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="regex on test names (within the quantized ops' tests)")
    parser.add_argument("--methods", default="ibp,crown")
    parser.add_argument("--zoo", action="store_true", help="the zoo's CNNs quantized in QOperator format instead")
    args = parser.parse_args()
    if args.zoo:
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            zoo([n for n in ZOO if not args.only or re.search(args.only, n)], args.methods.split(","), folder)
        return
    cases = collect()
    names = sorted(n for n in cases if re.search(PATTERN, n) and (not args.only or re.search(args.only, n)))
    methods = args.methods.split(",")
    totals = {m: {} for m in methods}
    for name in names:
        for method in methods:
            result = run(cases[name], method)
            totals[method][result["status"]] = totals[method].get(result["status"], 0) + 1
            print(f"{name:48s} {method:6s} {result['status']:8s} {result['detail']}", flush=True)
    for method, counts in totals.items():
        print(f"{method}: {len(names)} tests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()

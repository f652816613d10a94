"""The loaded model computes the function the user gave: checked against onnxruntime on the original file.

Normalisation folds constants, converts opsets and frees a batch of 1; each step is meant to keep the function,
and this check makes sure of it on random inputs: the normalised model at batch 1 against the original, and,
where the batch was freed, the normalised model at batch 2 against two batch-1 runs of the original.
"""
from __future__ import annotations

import numpy as np
import onnx

SEED = 20261204
# Relative and absolute (times the output's largest magnitude) tolerances per element type: constant folding
# and opset conversion reassociate float arithmetic, which moves results by a few units in the last place.
TOLERANCE = {onnx.TensorProto.FLOAT16: 2e-2, onnx.TensorProto.BFLOAT16: 5e-2, onnx.TensorProto.DOUBLE: 1e-6}
DEFAULT_TOLERANCE = 1e-3


# Ops whose outputs are random draws: two runs of the same model differ, so there is nothing to compare.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def _random(proto: onnx.ModelProto) -> bool:
    """Whether the model draws random numbers (a Dropout in training mode included)."""
    initializers = {init.name: init for init in proto.graph.initializer}
    for node in list(proto.graph.node) + [n for f in proto.functions for n in f.node]:
        if node.op_type in RANDOM_OPS:
            return True
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            mode = initializers.get(node.input[2])
            if mode is None or bool(onnx.numpy_helper.to_array(mode).reshape(-1)[0]):
                return True
    return False


class Disagreement(Exception):
    """The normalised model computes something else than the original (the message says what)."""


def runner(proto: onnx.ModelProto):
    """run(feeds) -> outputs by name, by onnxruntime, or by onnx's reference evaluator for what onnxruntime
    cannot load (newer opsets); None when neither runs the model."""
    try:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(names, feeds)))
    except Exception:
        pass
    try:
        from onnx.reference import ReferenceEvaluator
        evaluator = ReferenceEvaluator(proto)
        names = list(evaluator.output_names)
        return lambda feeds: dict(zip(names, evaluator.run(None, feeds)))
    except Exception:
        return None


def random_feeds(proto: onnx.ModelProto, batch: int, rng: np.random.Generator,
                 batch_inputs: set[str]) -> dict[str, np.ndarray]:
    """Random inputs of the declared types; unknown dimensions are 1, the batch axis of `batch_inputs` `batch`."""
    initializers = {init.name for init in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        if value.name in batch_inputs and dims:
            dims[0] = batch
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.floating) or tensor.elem_type == onnx.TensorProto.BFLOAT16:
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[value.name] = np.zeros(dims, dtype=dtype)  # indices and masks: 0 is valid everywhere
    return feeds


def compare(expected: dict, got: dict, elem_types: dict[str, int], what: str) -> None:
    for name, want in expected.items():
        if name not in got:
            continue
        have = np.asarray(got[name])
        want = np.asarray(want)
        if have.shape != want.shape:
            raise Disagreement(f"output {name} has shape {list(have.shape)} {what}, the original {list(want.shape)}")
        floating = np.issubdtype(want.dtype, np.floating) or want.dtype.name.startswith(("bfloat", "float"))
        if not floating and want.dtype != object:
            if not np.array_equal(have, want):
                raise Disagreement(f"output {name} differs {what}")
            continue
        want64, have64 = want.astype(np.float64), have.astype(np.float64)
        tol = TOLERANCE.get(elem_types.get(name), DEFAULT_TOLERANCE)
        finite = np.isfinite(want64)
        scale = float(np.abs(want64[finite]).max()) if finite.any() else 0.0
        close = np.isclose(have64, want64, rtol=tol, atol=tol * max(scale, 1e-3), equal_nan=True)
        if not close.all():
            worst = np.unravel_index(np.argmax(~close), close.shape)
            raise Disagreement(f"output {name} is {have64[worst]:.6g} {what} where the original gives "
                               f"{want64[worst]:.6g}")


def check(original: onnx.ModelProto, normalised: onnx.ModelProto, freed: set[str],
          dynamic: frozenset[str] = frozenset()) -> str | None:
    """None when the normalised model agrees with the original (or the original cannot be run to compare);
    raises Disagreement at batch 1 and, for inputs the original already takes at any batch (`dynamic`), at
    batch 2; returns why the `freed` batch does not hold at batch 2 (then the caller keeps the batch fixed)."""
    if _random(original):
        return None
    run_original = runner(original)
    if run_original is None:
        return None
    run_inner = runner(normalised)
    if run_inner is None:
        raise Disagreement("onnxruntime cannot run the normalised model")
    # A float16/bfloat16/float64 model is loaded in float32: its inputs are fed as float32.
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in normalised.graph.input}

    def run_normalised(feeds):
        return run_inner({k: np.asarray(v).astype(types[k]) if k in types else v for k, v in feeds.items()})

    elem_types = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    rng = np.random.default_rng(SEED)
    feeds = random_feeds(original, 1, rng, set())
    try:
        expected = run_original(feeds)
    except Exception:
        return None  # the original does not run on these inputs (data-dependent shapes): nothing to compare
    try:
        got = run_normalised(feeds)
    except Exception as exc:
        raise Disagreement(f"it fails at batch 1: {str(exc).strip().splitlines()[0][:200]}") from None
    compare(expected, got, elem_types, "at batch 1")
    if not freed:
        if dynamic:
            feeds = random_feeds(original, 2, rng, set(dynamic))
            try:
                expected = run_original(feeds)
            except Exception:
                return None
            try:
                got = run_normalised(feeds)
            except Exception as exc:
                raise Disagreement(f"it fails at batch 2: {str(exc).strip().splitlines()[0][:200]}") from None
            compare(expected, got, elem_types, "at batch 2")
        return None
    pair = [random_feeds(original, 1, rng, set()) for _ in range(2)]
    singles = [run_original(f) for f in pair]
    batched_feeds = {name: (np.concatenate([f[name] for f in pair]) if name in freed else pair[0][name])
                     for name in pair[0]}
    try:
        batched = run_normalised(batched_feeds)
    except Exception as exc:
        return f"it fails at batch 2 ({str(exc).strip().splitlines()[0][:160]})"
    # Outputs carry the batch on axis 0 when the model was exported with a batch of 1 on it.
    expected = {name: np.concatenate([s[name] for s in singles]) for name in singles[0]
                if np.ndim(singles[0][name]) >= 1 and np.shape(singles[0][name])[0] == 1}
    try:
        compare(expected, batched, elem_types, "at batch 2")
    except Disagreement as exc:
        return str(exc)
    return None

"""Real architectures (tests/arch_zoo.py, random weights) exported by torch's exporters, several opsets and a
float16 copy: each converts with every bounding method, passes the soundness harness, and runs through
`certify` (a tiny generated .npz) and `verify` (a generated VNN-LIB robustness property).

Cases that fail only because a rule is missing are strict xfails naming the op and the helper adding it: they
turn into failures once the rule lands (then the marker goes).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import arch_zoo
from graphcert import api
from graphcert import model as model_lib
from graphcert.errors import UnsupportedOpError
from graphcert.runtime import Session
from harness import check_bounds_sound, graph_bound_fn

# (architecture, exporter, opset, variant: False, True = a float16 copy, "qdq" = int8 QDQ) -> methods checked
EXPORTS = {**{(name, "dynamo", None, False): ("ibp", "crown-ibp", "crown") for name in arch_zoo.ARCHITECTURES},
           **{(name, "torchscript", 17, False): ("ibp",) for name in arch_zoo.ARCHITECTURES},
           ("resnet", "torchscript", 17, False): ("ibp", "crown"),
           ("convnext_tanh", "torchscript", 17, False): ("ibp", "crown"),
           ("resnet", "torchscript", 13, False): ("ibp", "crown"), ("lstm", "torchscript", 13, False): ("ibp",),
           ("resnet", "torchscript", 17, True): ("ibp", "crown"),
           ("efficientnet", "torchscript", 17, True): ("ibp", "crown"),
           ("residual_cnn", "torchscript", 17, "qdq"): ("ibp", "crown")}
EPS = 1e-3

# Rules missing on main today (none: the dynamo ViT's class-token Concat, whose batch extent comes from a
# ScatterElements on a Shape, goes through IBP with the rules reading it, `crown_support.fallbacks`).
MISSING: dict[str, str] = {}
# Cases of those architectures that already pass.
ALREADY: set = set()


def _missing(case, method=None) -> str | None:
    if case[3] == "qdq":
        return None
    if (case[0], case[1], method) in ALREADY:
        return None
    return MISSING.get(case[0])


def _id(case):
    name, exporter, opset, variant = case
    return f"{name}-{exporter}{opset or ''}{'-qdq' if variant == 'qdq' else '-fp16' if variant else ''}"


@pytest.fixture(scope="session")
def zoo_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("arch_zoo")


_EXPORTED: dict = {}


def exported(case, folder) -> str:
    """The case's ONNX file, exported once per session."""
    if case not in _EXPORTED:
        name, exporter, opset, variant = case
        path = arch_zoo.export(name, str(folder), exporter, opset)
        if variant == "qdq":
            path = arch_zoo.qdq_copy(path, str(folder))
        elif variant:
            path = arch_zoo.float16_copy(path, str(folder))
        _EXPORTED[case] = path
    return _EXPORTED[case]


def _params():
    params = []
    for case, methods in EXPORTS.items():
        for method in methods:
            reason = _missing(case, method)
            # Only the refusal is expected: anything else fails.
            marks = [pytest.mark.xfail(strict=True, reason=reason, raises=UnsupportedOpError)] if reason else []
            params.append(pytest.param(case, method, id=f"{_id(case)}-{method}", marks=marks))
    return params


@pytest.mark.parametrize("case,method", _params())
def test_converts_and_bounds_are_sound(case, method, zoo_folder):
    path = exported(case, zoo_folder)
    loaded = model_lib.load(path)
    assert model_lib.batch_note(loaded) is None, model_lib.batch_note(loaded)
    bound = api.to_proto(api.bound_graph(loaded, method))
    _, shape = arch_zoo.build(case[0])
    x0 = arch_zoo.sample_input(shape, seed=3)
    name, output = loaded.graph.inputs[0].name, loaded.graph.outputs[0].name
    # The harness runs the float32 model (the float16 copy is bounded over its exact weights; see dtypes.py).
    reference = api.to_proto(loaded)
    report = check_bounds_sound(reference, graph_bound_fn(bound, name, output), x0, EPS, n_random=6, corners=6,
                                pgd_steps=2, attack_targets=3)
    report.assert_sound()


CERTIFY_CASES = [c for c in EXPORTS if c[1] == "dynamo" and c[0] not in MISSING] + \
    [("resnet", "torchscript", 17, True), ("convnext_tanh", "torchscript", 17, False),
     ("residual_cnn", "torchscript", 17, "qdq")]


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in CERTIFY_CASES])
def test_certify_and_verify_run(case, zoo_folder, tmp_path):
    from graphcert.certify import certify
    from graphcert.data import Dataset
    path = exported(case, zoo_folder)
    loaded = model_lib.load(path)
    _, shape = arch_zoo.build(case[0])
    x = arch_zoo.sample_input(shape, n=4, seed=5)
    session = Session(api.to_proto(loaded))
    logits = session.run({session.input_names[0]: x})[session.output_names[0]]
    labels = logits.argmax(axis=1)
    # The zoo exercises ops the float32 rounding analysis has no rule for yet (LayerNorm, SiLU products):
    # these runs certify and verify in real arithmetic.
    result = certify(path, Dataset("zoo", x, labels, None), eps=EPS, method="auto", rounding="real")
    assert result.clean == 4 and result.stages["ibp"]["status"] == "ran"
    assert_verify_answers_robustness(path, session, x[0], int(labels[0]), logits.shape[1], EPS, tmp_path)


def assert_verify_answers_robustness(path, session, x0: np.ndarray, label: int, classes: int, eps: float,
                                     tmp_path) -> None:
    """verify (real arithmetic, 20 s) of the L-inf ball around x0 answers, and a counterexample it reports is
    classified otherwise by `session`."""
    from graphcert.verify import verify
    spec = tmp_path / "robust.vnnlib"
    spec.write_text(_robustness_property(x0, label, classes, eps))
    outcome = verify(path, spec, timeout=20, rounding="real")
    assert outcome.status in ("holds", "violated", "unknown", "timeout"), outcome
    if outcome.status == "violated":
        point, _ = outcome.counterexample
        y = session.run({session.input_names[0]: np.asarray(point, np.float32).reshape(1, *x0.shape)})
        assert y[session.output_names[0]].argmax() != label


def _robustness_property(x: np.ndarray, label: int, classes: int, eps: float) -> str:
    """The L-inf ball around x; the unsafe set: some other class scores at least the label's."""
    flat = x.reshape(-1)
    lines = [f"(declare-const X_{i} Real)" for i in range(flat.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(classes)]
    for i, v in enumerate(flat):
        lines.append(f"(assert (>= X_{i} {float(v) - eps:.9g}))")
        lines.append(f"(assert (<= X_{i} {float(v) + eps:.9g}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(classes) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"

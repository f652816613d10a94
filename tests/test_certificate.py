"""Certified-prediction graphs: plain ONNX served by onnxruntime, radii that certify and survive attacks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphcert
from conftest import cli_in_process
from graphcert.certify import certified_mask, certifier, margin_objective
from graphcert.data import load_dataset
from graphcert.errors import InputError
from graphcert.export import to_proto
from graphcert.passes.certificate import certificate_graph
from graphcert.torch_exec import TorchGraph

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "models" / "mnist_mlp.onnx")
LIPMLP = str(REPO / "models" / "mnist_lipmlp.onnx")
CASES = {"ibp": (MLP, "ibp", "linf", (0.0, 1.0), [0.002, 0.005, 0.01, 0.02, 0.03, 0.05]),
         "crown": (MLP, "crown", "linf", (0.0, 1.0), [0.005, 0.01, 0.02, 0.05, 0.1]),
         "crown-l2": (MLP, "crown", "l2", None, [0.05, 0.1, 0.2, 0.4]),
         "lipschitz": (LIPMLP, "lipschitz", "l2", None, None)}


@pytest.fixture(scope="module")
def images():
    return load_dataset("mnist-test").head(40)


def session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, images):
    path, method, norm, domain, ladder = CASES[request.param]
    model = graphcert.load(path)
    proto = to_proto(certificate_graph(model, method, domain, norm, ladder))
    out = session(proto).run(None, {"image": images.x})
    return request.param, model, proto, dict(zip([o.name for o in proto.graph.output], out))


def test_plain_onnx_at_batch_one_and_many(served, images):
    name, model, proto, out = served
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    plain = session(onnx.load(CASES[name][0])).run(None, {"image": images.x})[0]
    np.testing.assert_allclose(out["logits"], plain, rtol=1e-5, atol=1e-5)
    assert (out["prediction"] == plain.argmax(axis=1)).all()
    assert out["certified_radius"].dtype == np.float32 and (out["certified_radius"] >= 0).all()
    assert (out["certified_radius"] > 0).mean() > 0.5        # the certificate is not vacuous
    serve = session(proto)
    for k in (0, 7, 39):
        single = dict(zip(["logits", "prediction", "certified_radius"], serve.run(None, {"image": images.x[k:k + 1]})))
        assert single["prediction"][0] == out["prediction"][k]
        assert single["certified_radius"][0] == out["certified_radius"][k]
    if CASES[name][4] is not None:   # a ladder: every radius is one of its rungs, or 0
        assert set(np.unique(out["certified_radius"])) <= {0.0, *np.float32(CASES[name][4])}


def test_certify_agrees_at_the_radius(served, images):
    """certify's own certifier, at each sample's radius and with the prediction as label, certifies it."""
    name, model, _, out = served
    _, method, norm, domain, _ = CASES[name]
    radius, prediction = out["certified_radius"], out["prediction"]
    chosen = radius > 0
    # The certificate graph requires margins to beat the float32 rounding slack, as certify does by default.
    bounder = certifier(model, method, domain, norm=norm)
    logits, lower = bounder(images.x[chosen], radius[chosen].reshape(-1, 1, 1, 1),
                            margin_objective(prediction[chosen], 10))
    assert certified_mask(logits, lower, prediction[chosen]).all()
    if method == "lipschitz":   # the closed form is within 2^-10 of the largest radius this certifier allows
        logits, lower = bounder(images.x[chosen], (radius[chosen] * (1 + 2.0 ** -10)).reshape(-1, 1, 1, 1),
                                margin_objective(prediction[chosen], 10))
        assert not certified_mask(logits, lower, prediction[chosen]).any()


def pgd(model, x, prediction, radius, norm, domain, steps=40, restarts=2, seed=0):
    """Projected gradient descent on the predicted class's smallest margin within the ball (per-sample
    radius); returns the smallest margin found per sample (< 0: the prediction flipped)."""
    net = TorchGraph(model)
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(x)
    r = torch.tensor(radius, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    target = torch.tensor(prediction)
    worst = torch.full((len(x),), np.inf)

    def project(delta):
        if norm == "linf":
            delta = torch.maximum(torch.minimum(delta, r), -r)
        else:
            size = delta.flatten(1).norm(dim=1).reshape(r.shape).clamp_min(1e-12)
            delta = delta * torch.clamp(r / size, max=1.0)
        if domain is not None:
            delta = torch.clamp(x0 + delta, *domain) - x0
        return delta

    for _ in range(restarts):
        delta = project((torch.rand(x0.shape, generator=generator) * 2 - 1) * r)
        step = 2.5 * r / steps
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            logits = net({"image": x0 + delta})["logits"]
            own = logits.gather(1, target[:, None])[:, 0]
            others = logits.scatter(1, target[:, None], -np.inf).max(dim=1).values
            margin = own - others
            worst = torch.minimum(worst, margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == "linf":
                    move = grad.sign()
                else:
                    move = grad / grad.flatten(1).norm(dim=1).reshape(r.shape).clamp_min(1e-12)
                delta = project(delta - step * move)
    return worst.numpy()


def test_attacks_at_the_radius_never_flip(served, images):
    name, model, _, out = served
    _, method, norm, domain, _ = CASES[name]
    radius, prediction = out["certified_radius"], out["prediction"]
    chosen = radius > 0
    worst = pgd(model, images.x[chosen], prediction[chosen], radius[chosen], norm, domain)
    assert (worst > 0).all(), worst.min()
    # the same attack has teeth: well beyond the radii it flips predictions
    beyond = np.full(int(chosen.sum()), 0.3 if norm == "linf" else 4.0, dtype=np.float32)
    assert (pgd(model, images.x[chosen], prediction[chosen], beyond, norm, domain) < 0).any()


def test_convert_certificate_cli(tmp_path, capfd):
    out = tmp_path / "cert.onnx"
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "convert", "mnist_mlp", "--certificate", "--domain",
                           "0", "1", "--ladder", "0.01:0.03:0.01", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proto = onnx.load(out)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["graphcert.certificate.rungs"] == "0.01,0.02,0.03" and meta["graphcert.certificate.domain"] == "0,1"
    assert [o.name for o in proto.graph.output] == ["logits", "prediction", "certified_radius"]
    for args, words in ((["--ladder", "0,0.1"], "radii > 0"), (["--method", "gloro", "--norm", "l2"], "training"),
                        (["--method", "ibp", "--norm", "l2"], "L2"), (["--spec", str(out)], "no --spec")):
        # in this process (a child's start each); the successful run above is a child process
        bad = cli_in_process(capfd, "convert", "mnist_mlp", "--certificate", *args, "-o", tmp_path / "bad.onnx")
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "bad.onnx").exists()


def test_refuses_models_that_are_not_classifiers():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="batch axis"):
        certificate_graph(graphcert.load(proto), "ibp")


def test_convert_certificate_cli_rounding(tmp_path, capfd):
    """--rounding real writes radii for real arithmetic only (recorded in the metadata); float32 is the default;
    --rounding without --certificate is a one-line error."""
    for rounding in ("real", "float32"):
        out = tmp_path / f"{rounding}.onnx"
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "convert", "mnist_mlp", "--certificate",
                               "--ladder", "0.01", "--rounding", rounding, "-o", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        meta = {p.key: p.value for p in onnx.load(out).metadata_props}
        assert meta["graphcert.certificate.rounding"] == rounding
    bad = cli_in_process(capfd, "convert", "mnist_mlp", "--rounding", "real", "-o", tmp_path / "bad.onnx")
    assert bad.returncode == 2 and "--rounding goes with --certificate" in bad.stderr and "Traceback" not in bad.stderr

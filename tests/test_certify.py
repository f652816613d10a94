"""Certification maths: margin matrices, certified implies correct, agreement with an independent check."""
import numpy as np
import pytest

import graphcert
from graphcert.certify import certify, margin_objective
from graphcert.data import Dataset, load_dataset
from graphcert.errors import InputError
from graphcert.export import to_proto
from graphcert.interface import InputSet
from graphcert.runtime import Session

from pathlib import Path

MLP = str(Path(__file__).resolve().parents[1] / "models" / "mnist_mlp.onnx")


def test_margin_objective_rows():
    obj = margin_objective(np.array([2, 0]), 4)
    assert obj.shape == (2, 3, 4)
    assert (obj[0, :, 2] == 1).all() and sorted(np.argmin(obj[0], axis=1)) == [0, 1, 3]
    assert (obj.sum(axis=2) == 0).all()


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-test").head(300)


def test_eps_zero_certifies_exactly_the_correct_samples(mnist):
    result = certify(MLP, mnist, 0.0)
    assert result.certified == result.clean  # strict margins: ties are not certified, none occur here


def test_certified_accuracy_decreases_with_eps(mnist):
    values = [certify(MLP, mnist, eps).certified_accuracy for eps in (0.0, 0.002, 0.005, 0.02)]
    assert values == sorted(values, reverse=True)
    assert values[-1] < values[0]


def test_margin_bounds_beat_logit_bounds(mnist):
    """Certified by folded margins is a superset of certified by separate logit bounds (and agrees on IBP)."""
    eps = 0.003
    model = graphcert.load(MLP)
    bounds = Session(to_proto(graphcert.bound_graph(model, "ibp", InputSet("linf", (0.0, 1.0)))))
    out = bounds.run({"image": mnist.x, "epsilon": eps})
    lower, upper = out["logits_lower"], out["logits_upper"]
    y = mnist.y
    true_lower = lower[np.arange(len(y)), y]
    upper_others = upper.copy()
    upper_others[np.arange(len(y)), y] = -np.inf
    by_logits = (true_lower > upper_others.max(axis=1)).sum()
    result = certify(model, mnist, eps)
    assert result.certified >= by_logits


def test_certify_validates_inputs(mnist):
    with pytest.raises(InputError):
        certify(MLP, mnist, -1.0)
    with pytest.raises(InputError):
        certify(MLP, mnist, 0.1, batch_size=0)
    bad = Dataset("bad", mnist.x[:5], np.full(5, 12), (0.0, 1.0))
    with pytest.raises(InputError, match="labels"):
        certify(MLP, bad, 0.1)


def test_batch_size_does_not_change_results(mnist):
    a = certify(MLP, mnist, 0.004, batch_size=7)
    b = certify(MLP, mnist, 0.004, batch_size=300)
    assert (a.clean, a.certified) == (b.clean, b.certified)


def test_shipped_and_package_datasets():
    for name, shape in (("mnist-test", (10000, 1, 28, 28)), ("digits", (1797, 1, 8, 8))):
        data = load_dataset(name)
        assert data.x.shape == shape and data.domain == (0.0, 1.0)
        assert data.x.min() >= 0 and data.x.max() <= 1 and data.n_classes == 10


def test_npz_dataset_with_domain(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(6, 784).astype(np.float32), y=np.arange(6), domain=np.array([0.0, 1.0]))
    data = load_dataset(str(path))
    assert data.domain == (0.0, 1.0) and len(data) == 6
    result = certify(MLP, data, 0.0)
    assert result.n == 6


MNISTFC = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp2021" / "mnistfc" / "mnist-net_256x2.onnx"


def _pgd_min_margin(model, x, y, eps, steps=40):
    """Smallest margin logit[y] - max_j logit[j] that sign-gradient descent finds in the clipped L-inf ball."""
    import torch
    from graphcert.torch_exec import TorchGraph
    net = TorchGraph(model, trainable=False)
    name, out = model.graph.inputs[0].name, model.graph.outputs[0].name
    x0 = torch.tensor(x)
    lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    point = (lo + (hi - lo) * torch.rand_like(x0)).requires_grad_(True)
    labels = torch.tensor(y)
    worst = None
    for _ in range(steps):
        logits = net({name: point})[out]
        true = logits.gather(1, labels[:, None])[:, 0]
        others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -1e9).amax(1)
        margin = true - others
        worst = margin.detach() if worst is None else torch.minimum(worst, margin.detach())
        grad, = torch.autograd.grad(margin.sum(), point)
        with torch.no_grad():
            point = torch.max(torch.min(point - eps / 8 * grad.sign(), hi), lo).requires_grad_(True)
    return worst.numpy()


@pytest.mark.skipif(not MNISTFC.exists(), reason="needs ../shared (VNN-COMP mnistfc network)")
def test_stronger_methods_certify_more_and_stay_sound():
    data = load_dataset("mnist-test").head(60)
    model = graphcert.load(str(MNISTFC))
    eps = 0.012
    results = {m: certify(model, data, eps, method=m) for m in ("ibp", "crown-ibp", "crown", "alpha-crown", "auto")}
    counts = [results[m].certified for m in ("ibp", "crown-ibp", "crown", "alpha-crown")]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert results["auto"].certified >= results["alpha-crown"].certified  # auto ends with alpha-crown
    # Every sample `auto` certifies resists an attack inside its ball.
    auto = certifier_margins(model, data, eps)
    proved = (auto > 0).all(axis=1)
    x = data.x.reshape(len(data), 784, 1)
    attacked = _pgd_min_margin(model, x[proved], data.y[proved], eps)
    assert (attacked > 0).all()


@pytest.mark.skipif(not MNISTFC.exists(), reason="needs ../shared (VNN-COMP mnistfc network)")
def test_alpha_settings_reach_alpha_crown_and_zero_steps_is_crown():
    from graphcert.alpha import AlphaSettings
    data = load_dataset("mnist-test").head(40)
    model = graphcert.load(str(MNISTFC))
    crown = certify(model, data, 0.012, method="crown")
    unchanged = certify(model, data, 0.012, method="alpha-crown", alpha=AlphaSettings(iterations=0))
    optimised = certify(model, data, 0.012, method="alpha-crown", alpha=AlphaSettings(iterations=30, lr=0.2))
    assert unchanged.certified == crown.certified <= optimised.certified


def certifier_margins(model, data, eps):
    from graphcert.certify import certifier, margin_objective
    bound = certifier(model, "auto", (0.0, 1.0))
    _, lower = bound(data.x.reshape(len(data), 784, 1), eps, margin_objective(data.y, 10))
    return lower


def test_linear_relaxations_run_in_memory_sized_chunks_with_the_same_results(monkeypatch):
    import sys
    from graphcert.certify import GraphCertifier, margin_objective, samples_per_run
    certify_module = sys.modules["graphcert.certify"]   # graphcert.certify the attribute is the function
    model = graphcert.load(str(Path(MLP).with_name("mnist_cnn.onnx")))
    assert samples_per_run(model, "ibp") is None and samples_per_run(model, "crown") < 256
    data = load_dataset("mnist-test").head(10)
    x, objective = data.x.reshape(10, 1, 28, 28), margin_objective(data.y, 10)
    whole = GraphCertifier(model, "crown", (0.0, 1.0))(x, 0.01, objective)
    monkeypatch.setattr(certify_module, "COEFFICIENT_BYTES", 1)   # one sample per run
    chunked = GraphCertifier(model, "crown", (0.0, 1.0))
    assert chunked.per_run == 1
    for a, b in zip(whole, chunked(x, 0.01, objective)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_proof_watch_gives_up_on_each_sample_by_its_own_history():
    from graphcert.alpha import ProofWatch
    # Sample 0 climbs fast enough to reach 0 within the steps left, sample 1 stalls far below: keep going.
    watch = ProofWatch(lambda low: low.min(axis=1), iterations=20, give_up=True)
    for step in range(4):
        stop = watch(np.array([[-1.0 + 0.2 * step], [-5.0 + 0.001 * step]]), None)
    assert not stop
    # Once sample 0 is proved, the stalled sample alone cannot reach 0: stop.
    assert watch(np.array([[0.1], [-4.99]]), None)
    # Without give_up, only proving every sample stops the run.
    patient = ProofWatch(lambda low: low.min(axis=1), iterations=20, give_up=False)
    assert not any(patient(np.array([[0.1], [-5.0]]), None) for _ in range(6))
    assert patient(np.array([[0.1], [0.2]]), None)
    # One score for all (verify's weakest conjunct) behaves as before.
    single = ProofWatch(lambda low: float(low.min()), iterations=20, give_up=True)
    assert not any(single(np.array([-3.0 + 0.5 * k]), None) for k in range(4))

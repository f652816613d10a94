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

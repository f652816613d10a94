"""The README's headline numbers are what the shipped models give: each claim is read from README.md itself and
re-measured on the shipped MNIST test set, so a change that moves a number (a tighter rule, a stricter float
margin) fails here until the README says the new number."""
from __future__ import annotations

import pathlib
import re

import pytest

from graphcert.certify import certify
from graphcert.data import load_dataset
from graphcert.models import shipped_path

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
NUMBER = r"(\d+(?:\.\d+)?)"


def claims(pattern: str) -> list[float]:
    """The numbers captured by `pattern` in the README (whitespace-insensitive); fails when it is gone."""
    match = re.search(pattern.replace(" ", r"\s+"), README)
    assert match, f"README no longer states: {pattern}"
    return [float(g) for g in match.groups()]


def assert_rounds_to(measured: float, stated: float):
    """The README rounds to one decimal (half up): the measured percentage is within half a unit of it."""
    assert abs(100 * measured - stated) <= 0.05 + 1e-9, \
        f"README says {stated} %, the shipped model gives {100 * measured:.2f} %"


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-test")


def test_default_certify_numbers(mnist):
    clean, certified = claims(rf"prints about {NUMBER} % clean and {NUMBER} % certified accuracy")
    result = certify(shipped_path("mnist_mlp"), mnist, 0.01, method="ibp")
    assert_rounds_to(result.clean_accuracy, clean)
    assert_rounds_to(result.certified_accuracy, certified)


@pytest.mark.parametrize("model, pattern", [
    ("mnist_mlp_gloro", rf"certified on the MNIST test set at {NUMBER} / {NUMBER} / {NUMBER} % and "
                        rf"[\d.]+ / [\d.]+ / [\d.]+ % for L2 radii 0.1 / 0.3 / 0.5 \(clean {NUMBER} %"),
    ("mnist_cnn_gloro", rf"certified on the MNIST test set at [\d.]+ / [\d.]+ / [\d.]+ % and "
                        rf"{NUMBER} / {NUMBER} / {NUMBER} % for L2 radii 0.1 / 0.3 / 0.5 \(clean [\d.]+ % and "
                        rf"{NUMBER} %"),
    ("mnist_lipmlp", rf"`mnist_lipmlp` \([^)]*\) is {NUMBER} % clean and certified at {NUMBER} / {NUMBER} / "
                     rf"{NUMBER} % for L2 radii 0.1 / 0.3 / 0.5"),
])
def test_lipschitz_certified_numbers(mnist, model, pattern):
    numbers = claims(pattern)
    if model == "mnist_lipmlp":
        clean, *certified = numbers
    else:
        *certified, clean = numbers
    for radius, stated in zip((0.1, 0.3, 0.5), certified):
        result = certify(shipped_path(model), mnist, radius, method="lipschitz", norm="l2", rounding="real")
        assert_rounds_to(result.certified_accuracy, stated)
    assert_rounds_to(result.clean_accuracy, clean)


@pytest.mark.parametrize("model, pattern", [
    ("mnist_mlp_gloro", rf"for the float32 model \(the default\) at {NUMBER} / {NUMBER} / {NUMBER} % and "),
    ("mnist_cnn_gloro", rf"for the float32 model \(the default\) at [\d.]+ / [\d.]+ / [\d.]+ % and "
                        rf"{NUMBER} / {NUMBER} / {NUMBER} %"),
    ("mnist_lipmlp", rf"For the float32 model \(the default\) it certifies {NUMBER} / {NUMBER} / {NUMBER} %"),
])
def test_float32_certified_numbers(mnist, model, pattern):
    for radius, stated in zip((0.1, 0.3, 0.5), claims(pattern)):
        result = certify(shipped_path(model), mnist, radius, method="lipschitz", norm="l2")
        assert_rounds_to(result.certified_accuracy, stated)

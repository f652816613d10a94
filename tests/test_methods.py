"""The method registry is the one list: the CLI help, `inspect`, `certify`, `train` and the library all read it,
and a method registered in one place shows up everywhere."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

import cli
from graphcert import methods
from graphcert.certify import certify
from graphcert.data import Dataset
from graphcert.errors import InputError
from graphcert.inspect import describe

MLP = str(pathlib.Path(__file__).resolve().parents[1] / "models" / "mnist_mlp.onnx")


def help_of(command: str) -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def test_every_method_has_one_record_with_consistent_facts():
    records = methods.all_methods()
    assert set(records) >= {"ibp", "crown-ibp", "crown", "alpha-crown", "auto", "lipschitz", "gloro", "orthogonal"}
    for record in records.values():
        for norm in record.certify_stages:
            assert norm in record.norms
            assert all(stage in records and norm in records[stage].norms for stage in record.stages_of(norm))
        assert all(stage in records for stage in record.verify_stages)
        if record.role == "trains":
            assert records[record.certified_by].role == "bounds"


@pytest.mark.parametrize("command, listed", [
    ("certify", lambda: methods.names(role="bounds")),
    ("convert", lambda: methods.names(role="bounds", graph=True)),
    ("verify", lambda: methods.names(role="bounds", norm="linf")),
    ("train", lambda: methods.names(role=None, trainable=True)),
])
def test_cli_help_lists_exactly_the_registered_methods(command, listed):
    text = help_of(command)
    for name in listed():
        assert name in text, f"{command} --help does not list {name}"
    for name in set(methods.names(role=None)) - set(listed()):
        assert f" {name}," not in text and f" {name} " not in text.split("--method", 1)[1].split("(default")[0], \
            f"{command} --help lists {name}, which it does not take"


def test_inspect_reports_every_method_that_has_a_support_check():
    info = describe(MLP)
    assert set(info["methods"]) == set(methods.names(role=None))
    assert all(missing == [] for missing in info["methods"].values())


@pytest.mark.parametrize("name", methods.names(role="bounds"))
def test_certify_takes_every_bounding_method_in_each_of_its_norms(name):
    rng = np.random.default_rng(0)
    data = Dataset("random", rng.random((3, 1, 28, 28), dtype=np.float32), np.arange(3), (0.0, 1.0))
    for norm in methods.get(name).norms:
        result = certify(MLP, data, 0.001, method=name, norm=norm)
        assert result.n == 3 and 0 <= result.certified <= result.clean


@pytest.mark.parametrize("name", methods.names(role="trains"))
def test_training_only_methods_are_refused_with_what_certifies_instead(name):
    rng = np.random.default_rng(0)
    data = Dataset("random", rng.random((2, 1, 28, 28), dtype=np.float32), np.arange(2), (0.0, 1.0))
    with pytest.raises(InputError, match=methods.get(name).certified_by):
        certify(MLP, data, 0.1, method=name, norm="l2")


def test_a_registered_method_appears_everywhere():
    """Adding a method is one register() call: here a copy of ibp under a new name."""
    record = dataclasses.replace(methods.get("ibp"), name="ibp-copy", summary="a test copy of ibp")
    methods.register(record)
    try:
        assert "ibp-copy" in help_of("certify") and "ibp-copy" in help_of("convert")
        assert "ibp-copy" in describe(MLP)["methods"]
        rng = np.random.default_rng(0)
        data = Dataset("random", rng.random((4, 1, 28, 28), dtype=np.float32), np.arange(4), (0.0, 1.0))
        same, copy = certify(MLP, data, 0.01, method="ibp"), certify(MLP, data, 0.01, method="ibp-copy")
        assert (same.clean, same.certified) == (copy.clean, copy.certified)
    finally:
        del methods.REGISTRY["ibp-copy"]


def test_unknown_method_lists_the_registry():
    with pytest.raises(InputError, match="choose one of: " + ", ".join(methods.names())):
        methods.get("nope")

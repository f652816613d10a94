"""verify --method alpha-crown and auto: same answers as the graph methods, and the clock still rules."""
from __future__ import annotations

import pytest

from conftest import VNNCOMP
from graphcert import methods
from graphcert.verify import verify
from test_verify import check_holds_above_maximum_and_violated_below, hopeless_instance


@pytest.mark.parametrize("method", methods.names(graph=False, norm="linf"))
def test_ladder_methods_prove_and_falsify_the_tiny_network(tmp_path, method):
    check_holds_above_maximum_and_violated_below(tmp_path, method)


@pytest.mark.parametrize("method", methods.names(graph=False, norm="linf"))
def test_ladder_methods_respect_the_timeout(tmp_path, method):
    model, spec = hopeless_instance(tmp_path)
    result = verify(model, spec, timeout=3.0, method=method)
    assert result.status in ("timeout", "unknown")
    assert result.seconds < 4.0


@pytest.mark.skipif(not VNNCOMP.exists(), reason="needs ../shared (VNN-COMP 2021 benchmarks)")
@pytest.mark.parametrize("net, prop, truth", [
    ("ACASXU_run2a_1_2_batch_2000.onnx", "prop_2.vnnlib", "violated"),
    ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", "holds"),
])
def test_auto_on_acasxu(net, prop, truth):
    folder = VNNCOMP / "acasxu"
    result = verify(folder / net, folder / prop, timeout=30, method="auto")
    assert result.status != ("holds" if truth == "violated" else "violated")
    if truth == "violated":
        assert result.status == "violated"

"""Radius sweeps, per-sample certified radii, per-sample CSV and plots (certify curves and cactus plots)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphcert.certify import certifier, certified_mask, certify, margin_objective
from graphcert.data import load_dataset
from graphcert.errors import InputError
from graphcert.sweep import parse_eps, parse_methods, sweep
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "models" / "mnist_mlp.onnx")
LIPMLP = str(REPO / "models" / "mnist_lipmlp.onnx")


def graphcert(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-test").head(60)


def test_radii_are_rounded_up_to_float32():
    from graphcert.certify import rows_of
    for eps in (0.01, 0.1, 1 / 3, 0.3):
        assert float(rows_of(eps, slice(None))) >= eps
    per_sample = rows_of(np.array([0.1, 0.2, 0.3]).reshape(-1, 1), [0, 2])
    assert per_sample.dtype == np.float32 and (per_sample[:, 0].astype(np.float64) >= [0.1, 0.3]).all()


def test_parse_eps_lists_and_ranges():
    assert parse_eps("0.02,0.005,0.01,0.01") == [0.005, 0.01, 0.02]
    assert parse_eps("0:0.03:0.01") == [0.0, 0.01, 0.02, 0.03]
    assert parse_eps("0.1") == [0.1]
    for bad in ("abc", "0:1", "1:0:0.1", "0:1:0", "-0.1", "nan", "0:1:1e-6", ","):
        with pytest.raises(InputError):
            parse_eps(bad)
    assert parse_methods("ibp, crown,ibp") == ["ibp", "crown"]


@pytest.mark.parametrize("model,methods,norm,eps", [
    (MLP, ["ibp", "crown-ibp"], "linf", [0.0, 0.005, 0.01, 0.02]),
    (LIPMLP, ["lipschitz"], "l2", [0.1, 0.3, 0.5, 1.0]),
])
def test_sweep_agrees_with_certify_at_every_radius(mnist, model, methods, norm, eps):
    result = sweep(model, mnist, eps, methods, norm=norm)
    rows = {(r.method, r.eps): r for r in result.rows()}
    assert len(rows) == len(methods) * len(eps)
    for method in methods:
        for e in eps:
            single = certify(model, mnist, e, method=method, norm=norm)
            assert rows[method, e].clean == single.clean
            # skipping samples already uncertified at a smaller radius may only lose certificates; on these
            # methods (monotone in the radius) it loses none
            assert rows[method, e].certified == single.certified, (method, e)
        flags = result.certified[method]
        assert (flags[:, 1:] <= flags[:, :-1]).all()   # certified at a radius -> at every smaller one


# lipmlp's Lipschitz certificates hold in real arithmetic only (the float32 slack takes them all: RESULTS.md).
@pytest.mark.parametrize("model,method,norm,rounding", [(MLP, "ibp", "linf", "float32"),
                                                        (MLP, "crown", "linf", "float32"),
                                                        (LIPMLP, "lipschitz", "l2", "real")])
def test_radius_is_certified_and_nearly_the_largest(mnist, model, method, norm, rounding):
    data = mnist.head(25)
    tolerance = 1e-3
    result = sweep(model, data, [0.01], [method], norm=norm, radius=True, tolerance=tolerance, rounding=rounding)
    radii = result.radii[method]
    correct = result.predictions == result.labels
    assert (radii[~correct] == 0).all() and (radii[correct] > 0).all()
    import graphcert
    bounder = certifier(graphcert.load(model), method, data.domain, norm=norm, rounding=rounding)
    objective = margin_objective(data.y, 10)
    shaped = lambda r: np.asarray(r, np.float32).reshape(-1, 1, 1, 1)
    logits, lower = bounder(data.x, shaped(radii), objective)
    assert certified_mask(logits, lower, data.y)[correct].all()      # certified at the reported radius
    above = radii * (1 + 2.0 ** -9) + (0 if method == "lipschitz" else tolerance)
    logits, lower = bounder(data.x, shaped(above), objective)
    assert not certified_mask(logits, lower, data.y)[correct].any()  # and not beyond the tolerance
    stats = result.radius_stats()[method]
    assert stats["median"] == pytest.approx(float(np.median(radii)))
    assert stats["tolerance"] == (0.0 if method == "lipschitz" else tolerance)


def test_per_sample_csv_and_json_rows(tmp_path, mnist):
    out = tmp_path / "samples.csv"
    proc = graphcert("certify", "mnist_mlp", "--eps", "0.01,0.005", "--method", "ibp,crown-ibp", "--limit", "30",
                     "--radius", "--radius-tol", "1e-3", "--per-sample", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [(r["method"], r["eps"]) for r in result["rows"]] == [("ibp", 0.005), ("ibp", 0.01),
                                                                  ("crown-ibp", 0.005), ("crown-ibp", 0.01)]
    assert set(result["radius"]) == {"ibp", "crown-ibp"} and "median" in result["radius"]["ibp"]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and list(rows[0])[:3] == ["index", "label", "prediction"]
    assert {"certified_ibp_0.005", "certified_crown-ibp_0.01", "radius_ibp", "radius_crown-ibp"} <= set(rows[0])
    certified = sum(int(r["certified_ibp_0.01"]) for r in rows)
    assert certified == next(r["certified"] for r in result["rows"] if r["method"] == "ibp" and r["eps"] == 0.01)
    for r in rows:   # a sample certified at a radius has a certified radius at least that large (IBP: monotone)
        if r["certified_ibp_0.01"] == "1":
            assert float(r["radius_ibp"]) >= 0.0099


def test_sweep_text_table_and_plots(tmp_path):
    png, svg = tmp_path / "curve.png", tmp_path / "curve.svg"
    proc = graphcert("certify", "mnist_mlp", "--eps", "0:0.02:0.01", "--method", "ibp", "--limit", "20",
                     "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "ibp" in proc.stdout and "0.02" in proc.stdout and "certified" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = graphcert("certify", "mnist_mlp", "--eps", "0.01", "--limit", "20", "--plot", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert b"<svg" in svg.read_bytes()[:2000]
    bad = graphcert("certify", "mnist_mlp", "--eps", "0.01", "--limit", "20", "--plot", str(tmp_path / "c.pdf"))
    assert bad.returncode == 2 and "png or .svg" in bad.stderr and not (tmp_path / "c.pdf").exists()


def test_cactus_plot_with_reference(tmp_path):
    from graphcert.plots import cactus_figure, plot_cactus, read_reference
    from graphcert.verify import InstanceResult
    results = [InstanceResult("a.onnx", "p.vnnlib", "holds", 0.5, 60), InstanceResult("b.onnx", "p.vnnlib", "violated", 2.0, 60),
               InstanceResult("c.onnx", "p.vnnlib", "unknown", 60.0, 60)]
    reference = tmp_path / "ref.csv"
    reference.write_text("family,onnx,vnnlib,timeout_used,abcrown_answer,wall_s,truth\n"
                         "f,a.onnx,p.vnnlib,60,safe,3.0,holds\nf,c.onnx,p.vnnlib,60,timeout,60,unknown\n"
                         "f,z.onnx,p.vnnlib,60,safe,1.0,holds\n")
    rows = read_reference(reference)
    fig = cactus_figure(results, rows)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["graphcert (2)", "reference (1)"]   # only the shared instances count; z is not one
    out = tmp_path / "cactus.svg"
    plot_cactus(results, out, reference)
    assert b"<svg" in out.read_bytes()[:2000]
    (tmp_path / "bad.csv").write_text("onnx,vnnlib\na,b\n")
    with pytest.raises(InputError):
        read_reference(tmp_path / "bad.csv")


def test_verify_instances_cactus_cli(tmp_path):
    folder = shared_path("benchmarks", "vnncomp2021", "test")
    out = tmp_path / "cactus.png"
    proc = graphcert("verify", "--instances", str(folder / "test_instances.csv"), "--timeout-scale", "0.1",
                     "--plot", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and "wrote cactus plot" in proc.stdout
    # a missing reference is a one-line error, caught before any verification
    proc = graphcert("verify", "--instances", str(folder / "test_instances.csv"), "--plot", str(out),
                     "--reference", str(tmp_path / "missing.csv"))
    assert proc.returncode == 2 and "reference results not found" in proc.stderr
    proc = graphcert("verify", "--plot", str(out), MLP, str(folder / "test_prop.vnnlib"))
    assert proc.returncode == 2 and "--instances" in proc.stderr

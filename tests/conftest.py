"""Shared test helpers: the read-only benchmark networks beside the repository, skipped when absent.

The project never reads `../shared` at run time; only tests do, and they skip with a reason when it is not
there (a fresh clone elsewhere).
"""
from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
VNNCOMP = SHARED / "benchmarks" / "vnncomp2021"


def shared_path(*parts: str) -> pathlib.Path:
    """A path under ../shared, or a skip of the calling test when it does not exist."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


def benchmark_networks(family: str, every: int = 1) -> list:
    """pytest params over the ONNX networks of one VNN-COMP 2021 family (every `every`-th one, in name
    order), or a single skipped param when the shared benchmarks are absent."""
    folder = VNNCOMP / family
    paths = sorted(folder.glob("*.onnx"))[::every] if folder.is_dir() else []
    if not paths:
        return [pytest.param(None, id=f"{family}-absent",
                             marks=pytest.mark.skip(reason=f"shared benchmarks not found at {folder}"))]
    return [pytest.param(path, id=path.stem) for path in paths]


@pytest.fixture
def shared_dir() -> pathlib.Path:
    return shared_path()


def cli_in_process(capfd, *args) -> SimpleNamespace:
    """`graphcert ARGS` run by cli.main in this process, with what it wrote to the stdout and stderr file
    descriptors: returncode, stdout, stderr like subprocess.run's result. An exception cli.main does not turn into
    a one-line error propagates (the test fails on it, as on a traceback). Spares a child process's 3 s start;
    each command's tests keep one run in a child process for what only a process shows (its exit status)."""
    import cli
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    out, err = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(scope="session")
def mixed_instances(tmp_path_factory):
    """An instances file of the shared test family and five ACAS Xu rows (four decided, one timing out at 4 s),
    and the verdicts [(onnx, vnnlib, status)] of one serial `verify --instances` run on it (timeout scale 0.5,
    real arithmetic): the local-worker and Ray tests compare their runs with it (one serial run for both)."""
    import os

    import cli
    from parallel_tasks import ACAS_QUICK, ACAS_SLOW, acas_instances, results_rows, shared_test_family
    folder = tmp_path_factory.mktemp("mixed_instances")
    instances = folder / "instances.csv"
    acas_instances(instances, ACAS_QUICK + [ACAS_SLOW], timeout=4)
    family = shared_test_family()
    test_rows = [line.split(",") for line in family.read_text().splitlines() if line]
    instances.write_text("".join(f"{family.parent / o},{family.parent / v},{t}\n" for o, v, t in test_rows)
                         + instances.read_text())
    out = folder / "serial.csv"
    code = cli.main([str(a) for a in ("verify", "--instances", instances, "--out", out, *MIXED_OPTIONS)])
    assert code == 0
    return instances, [(os.path.basename(r[0]), os.path.basename(r[1]), r[2]) for r in results_rows(out)]


# verify's options for every run on `mixed_instances` (the competition's answers are in real arithmetic)
MIXED_OPTIONS = ("--timeout-scale", "0.5", "--rounding", "real")

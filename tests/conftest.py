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

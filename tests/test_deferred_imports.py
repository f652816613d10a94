"""Deferred imports (`graphcert.deferred_imports`): sympy loads only when a symbolic dimension's arithmetic needs
it, and a deferred module behaves as an imported one once used."""
import pathlib
import subprocess
import sys
import textwrap
import threading

import pytest

import cli
from graphcert import deferred_imports
from conftest import shared_path

ROOT = str(pathlib.Path(cli.__file__).parent)


def run_python(script: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_sympy_waits_for_symbolic_arithmetic_and_then_works():
    found = run_python("""
        import sys, types
        import graphcert.api, torch
        sympy = sys.modules["sympy"]
        print(type(sympy).__name__, sympy.__file__.endswith("__init__.py"), type(sympy).__name__)
        import onnx_ir as ir
        print(ir.SymbolicDim("N") * 2 + 1, type(sympy) is types.ModuleType)
        from sympy import Max, Symbol
        print(Max(3, Symbol("x")).func.__name__, sympy.Integer(4) + 1)
    """)
    # Reading __file__ (as inspect.getmodule does for every module) leaves it unexecuted.
    assert found == ["DeferredModule", "True", "DeferredModule", "2*N", "+", "1", "True", "Max", "5"]


def test_a_verify_run_through_torch_never_executes_sympy():
    """alpha-CROWN bounds through torch (`graphcert.torch_exec`), whose kernels must not pull in torch.fx."""
    model = shared_path("benchmarks", "vnncomp2021", "acasxu", "ACASXU_run2a_5_7_batch_2000.onnx")
    found = run_python("""
        import sys
        from graphcert.verify import verify
        r = verify(sys.argv[1], sys.argv[2], timeout=60, method="alpha-crown")
        print(r.status, "torch" in sys.modules, type(sys.modules["sympy"]).__name__)
    """, str(model), str(model.parent / "prop_3.vnnlib"))
    assert found == ["holds", "True", "DeferredModule"]


@pytest.fixture
def deferred_package(tmp_path, monkeypatch):
    """A package `deferred_probe` whose modules the finder defers: `slow` counts its runs, `broken` raises."""
    package = tmp_path / "deferred_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "slow.py").write_text("import time, builtins\n"
                                     "builtins.deferred_probe_runs = getattr(builtins, 'deferred_probe_runs', 0) + 1\n"
                                     "time.sleep(0.2)\nVALUE = 7\n")
    (package / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(deferred_imports, "DEFERRED", frozenset({"deferred_probe.slow", "deferred_probe.broken"}))
    deferred_imports.install()
    yield
    for name in ("deferred_probe.slow", "deferred_probe.broken", "deferred_probe"):
        sys.modules.pop(name, None)
    import builtins
    if hasattr(builtins, "deferred_probe_runs"):
        del builtins.deferred_probe_runs


def test_threads_reading_a_deferred_module_at_once_run_it_once(deferred_package):
    import builtins

    from deferred_probe import slow
    assert type(slow) is deferred_imports.DeferredModule and not hasattr(builtins, "deferred_probe_runs")
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(slow.VALUE)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [7] * 4 and builtins.deferred_probe_runs == 1


def test_a_deferred_module_that_fails_raises_at_first_use_and_is_not_left_imported(deferred_package):
    from deferred_probe import broken
    with pytest.raises(RuntimeError, match="broken on purpose"):
        broken.anything
    assert "deferred_probe.broken" not in sys.modules


def test_dir_of_a_deferred_module_runs_it_first(deferred_package):
    from deferred_probe import slow
    assert "VALUE" in dir(slow) and slow.VALUE == 7

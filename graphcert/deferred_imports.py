"""Libraries loaded on first use instead of at import.

onnx_ir imports sympy (0.3 s, a third of what `graphcert verify` spends before it reads the model) only for the
arithmetic of symbolic dimensions, which most runs never do: onnx_ir keeps a dimension's sympy expression unbuilt
until asked (`SymbolicDim._expr`). Its expression parser `onnx_ir._symbolic_shapes` reads sympy's functions when
imported, so it is deferred too.

A deferred module is created as an import would create it (its `__name__`, `__file__`, `__spec__`, `__path__`
are there) but its code runs at the first read of any other attribute. The standard library's
`importlib.util.LazyLoader` runs it at the first read of any attribute, `__file__` included, and
`inspect.getmodule` reads every module's `__file__` (torch's import calls it): sympy would load there after all.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types

DEFERRED = frozenset({"sympy", "onnx_ir._symbolic_shapes"})

_LOADING = threading.RLock()
_RUNNING: set[str] = set()   # deferred modules whose code is running (in the thread holding _LOADING)


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet: the first read of an attribute it does not have yet, or `dir()` of
    it, runs it (other threads reading it meanwhile wait for it)."""

    def __getattr__(self, name: str):
        _run(self, name)
        return getattr(self, name)

    def __dir__(self):
        _run(self, "__dir__")
        return dir(self)


def _run(module: DeferredModule, name: str) -> None:
    """Run a deferred module's code, unless another thread did (`name`: the attribute that asked for it)."""
    with _LOADING:
        if type(module) is not DeferredModule:
            return
        if module.__name__ in _RUNNING:  # read by its own code as it runs: as any partly run module
            raise AttributeError(f"partially initialized module {module.__name__!r} has no attribute {name!r}")
        _RUNNING.add(module.__name__)
        try:
            module.__spec__.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module.__name__, None)   # as a failed import leaves it
            raise
        finally:
            _RUNNING.discard(module.__name__)
            module.__class__ = types.ModuleType


class DeferringLoader(importlib.abc.Loader):
    """Wraps the loader the path finder found: creates the module as it would, runs its code later."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader   # the loader that runs it when first read
        module.__class__ = DeferredModule


class DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds the DEFERRED modules where the path finder does and defers running their code."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        # Only plain source or bytecode modules (an extension module's object is made by its own loader).
        if spec is None or not isinstance(spec.loader, (importlib.machinery.SourceFileLoader,
                                                        importlib.machinery.SourcelessFileLoader)):
            return None   # the usual import machinery then handles it as always
        spec.loader = DeferringLoader(spec.loader)
        return spec


def install() -> None:
    """Defer the DEFERRED modules not imported yet (those already imported stay as they are)."""
    if not any(isinstance(finder, DeferringFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeferringFinder())

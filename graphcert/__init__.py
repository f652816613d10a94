"""graphcert: a graph-rewriting compiler over ONNX models for certified robustness."""
__version__ = "0.1.0"

from . import deferred_imports

deferred_imports.install()   # sympy (through onnx_ir) loads on first use: 0.3 s of every command's start

__all__ = ["bound_graph", "certify", "convert", "load", "load_dataset", "save", "__version__"]

# The API is imported on first use (PEP 562), so the command line starts without loading onnx or torch when it
# only parses arguments or prints help.
_HOMES = {"bound_graph": "api", "convert": "api", "load": "api", "certify": "certify", "load_dataset": "data",
          "save": "export"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphcert' has no attribute {name!r}")

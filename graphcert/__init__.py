"""graphcert: a graph-rewriting compiler over ONNX models for certified robustness."""
__version__ = "0.1.0"

from .api import bound_graph, convert, load  # noqa: E402
from .certify import certify  # noqa: E402
from .data import load_dataset  # noqa: E402
from .export import save  # noqa: E402

__all__ = ["bound_graph", "certify", "convert", "load", "load_dataset", "save", "__version__"]

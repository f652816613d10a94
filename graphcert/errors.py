"""Typed errors: library code raises these, the CLI prints them as one line and exits with code 2."""


class GraphcertError(Exception):
    """Base class: the message names the problem and what to do about it."""


class ModelLoadError(GraphcertError):
    """The model file is missing, unreadable or not valid ONNX."""


class UnsupportedOpError(GraphcertError):
    """A pass met op types it has no rule for."""

    def __init__(self, method: str, nodes_by_op: dict[str, list[str]], reasons: dict[str, str] | None = None):
        """reasons: node name -> why the node is refused although its op has a rule (shown after the name)."""
        self.nodes_by_op = nodes_by_op
        reasons = self.reasons = reasons or {}

        def named(name: str) -> str:
            return f"{name}: {reasons[name]}" if name in reasons else name
        listed = "; ".join(
            f"{op} ({', '.join(named(n) for n in names[:5])}{', ...' if len(names) > 5 else ''})"
            for op, names in sorted(nodes_by_op.items())
        )
        super().__init__(
            f"method '{method}' has no rule for op type(s): {listed}; "
            f"run 'graphcert inspect MODEL' to see which methods support which ops"
        )


class InputError(GraphcertError):
    """Bad user input: data files, shapes, epsilon values, options."""


class SpecError(GraphcertError):
    """A malformed or unsupported VNN-LIB property."""


class RunError(GraphcertError):
    """Tasks of a parallel or resumable run failed after their retries (the message says which and why)."""

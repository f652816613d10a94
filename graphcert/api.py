"""The Python API behind the CLI: build bound graphs by method name, with or without a folded spec."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir

from . import methods
from . import model as model_lib
from .errors import InputError
from .export import save, to_proto
from .interface import InputSet

# The method tables live in graphcert.methods (one record per method); these names stay for callers.
NORM_NAMES = methods.NORM_NAMES
check_norm = methods.check_norm


def bounding_methods(norm: str) -> list[str]:
    """The methods that give sound bounds on balls of `norm`."""
    return methods.names(role="bounds", norm=norm)


def load(source) -> ir.Model:
    """Read and normalise an ONNX model (path, ModelProto or onnx_ir.Model)."""
    return model_lib.load(source)


def bound_graph(model, method: str = "ibp", input_set: InputSet | None = None,
                spec: np.ndarray | str | None = None, spec_offset: np.ndarray | None = None,
                keep_original: bool = True, trainable: bool = False, norm: str = "linf",
                native_types: bool = False) -> ir.Model:
    """The bound graph of `model` by `method`.

    spec: None bounds the outputs; a [m, n] matrix bounds margins C·y + spec_offset (output `margins`);
    "runtime" adds an `objective` input [batch, m, n] and bounds objective·y.
    norm: "linf" (epsilon is the L-inf radius) or "l2" (epsilon is the L2 radius; crown, crown-ibp, lipschitz).
    native_types: a float16/bfloat16/float64 model's graph takes and returns that type (bounds rounded
    outward); otherwise (what certify and verify feed) every graph computes and talks float32.
    """
    record = methods.get(method)
    if record.combines != "graph":
        raise InputError(f"method '{method}' combines several bound graphs at run time ("
                         f"{', '.join(record.stages_of(norm))}); build one of those: "
                         f"{', '.join(methods.names(graph=True, role='bounds', norm=norm))}")
    check_norm(method, norm)
    normalised = model if isinstance(model, ir.Model) else load(model)
    kwargs = {"keep_original": keep_original}
    own_objective = isinstance(spec, str) and record.own_objective
    if own_objective:
        kwargs["objective"] = True
    elif spec is not None:
        from graphcert.passes.spec import SpecPass
        matrix = None if isinstance(spec, str) else np.asarray(spec, dtype=np.float32)
        normalised = SpecPass(matrix, spec_offset, keep_output=keep_original)(normalised).model
    factory = record.build
    if trainable:
        kwargs["trainable"] = True
    if norm != "linf":
        kwargs["norm"] = norm
    bound = factory(input_set or InputSet(), **kwargs)(normalised).model
    dtype = normalised.metadata_props.get("graphcert.dtype")
    if native_types and dtype:
        from .dtypes import restore_interface
        from .interface import epsilon_name, perturbed_inputs
        import json
        restore_interface(bound, dtype, {epsilon_name(normalised, x) for x in perturbed_inputs(normalised)},
                          json.loads(normalised.metadata_props.get("graphcert.io_dtypes", "{}")))
    return bound


def convert(model_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "ibp",
            domain: tuple[float, float] | None = None, spec_path: str | None = None,
            norm: str = "linf", perturb: list[str] | None = None) -> onnx.ModelProto:
    """Write the bound graph of a model file (`epsilon` an L-inf or, with norm "l2", an L2 radius); never
    overwrites the input. `perturb` names the inputs to perturb (default: the first floating-point input),
    each with its own radius `<name>_epsilon` when there are several; the other inputs are fed as given."""
    from .files import refuse_overwrite
    from .interface import fix_inputs
    check_norm(method, norm)
    refuse_overwrite([out_path], [model_path, spec_path])
    normalised = fix_inputs(load(model_path), perturb)
    spec, offset = None, None
    if spec_path is not None:
        from graphcert.vnnlib import load_property
        prop = load_property(spec_path)
        _check_property_fits(prop, normalised, model_path, spec_path)
        spec, offset = prop.stacked_rows()
    bound = bound_graph(normalised, method, InputSet("linf", domain), spec=spec, spec_offset=offset, norm=norm,
                        native_types=True)
    proto = to_proto(bound)
    save(proto, out_path, source=model_path)
    return proto


def _check_property_fits(prop, model: ir.Model, model_path, spec_path) -> None:
    from .errors import SpecError
    from .interface import perturbed_inputs
    from .model import static_shape

    def per_sample(value) -> int | None:
        dims = static_shape(value)
        dims = dims[1:] if len(dims) >= 2 else dims
        return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None

    inputs = perturbed_inputs(model)
    n_in = per_sample(inputs[0]) if len(inputs) == 1 else None
    n_out = per_sample(model.graph.outputs[0])
    if (n_in is not None and n_in != prop.n_inputs) or (n_out is not None and n_out != prop.n_outputs):
        raise SpecError(f"{spec_path} declares {prop.n_inputs} inputs and {prop.n_outputs} outputs, but "
                        f"{model_path} has {n_in} inputs and {n_out} outputs; pick the property for this model")


def convert_certificate(model_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "ibp",
                        domain: tuple[float, float] | None = None, norm: str = "linf",
                        ladder=None, rounding: str = "float32") -> onnx.ModelProto:
    """Write the certified-prediction graph of a model file (input -> logits, prediction, certified_radius; see
    graphcert.passes.certificate; `rounding` "real" for radii in real arithmetic only); never overwrites the
    input."""
    from graphcert.passes.certificate import certificate_graph
    from .files import refuse_overwrite
    methods.check_certifies(method, norm)
    refuse_overwrite([out_path], [model_path])
    proto = to_proto(certificate_graph(load(model_path), method, domain, norm, ladder, rounding))
    save(proto, out_path, source=model_path)
    return proto

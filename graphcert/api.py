"""The Python API behind the CLI: build bound graphs by method name, with or without a folded spec."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from . import model as model_lib
from .errors import InputError
from .export import save, to_proto
from .interface import InputSet

# method name -> factory(input_set, keep_original, trainable) returning an onnx_ir pass.
METHODS: dict[str, Callable[..., ir.passes.PassBase]] = {}
# method name -> supports(node) -> bool, for `inspect` and early errors.
SUPPORTS: dict[str, Callable[[ir.Node], bool]] = {}
# method name -> the perturbation norms it bounds; factories of methods with "l2" take a `norm` keyword.
NORMS: dict[str, tuple[str, ...]] = {}
# Methods that fold a run-time objective themselves: their factory takes `objective=True` for spec="runtime".
OWN_OBJECTIVE: set[str] = set()
# Methods whose graphs only train (their bounds are estimates) -> why, and what certifies instead; never
# suggested for certify or convert.
TRAINING_ONLY: dict[str, str] = {}
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}


def register_method(name: str, factory: Callable[..., ir.passes.PassBase],
                    supports: Callable[[ir.Node], bool] | None = None, norms: tuple[str, ...] = ("linf",),
                    own_objective: bool = False, training_only: str | None = None) -> None:
    METHODS[name] = factory
    NORMS[name] = norms
    if supports is not None:
        SUPPORTS[name] = supports
    if own_objective:
        OWN_OBJECTIVE.add(name)
    if training_only:
        TRAINING_ONLY[name] = training_only


def bounding_methods(norm: str) -> list[str]:
    """The registered methods that give sound bounds on balls of `norm`."""
    return sorted(m for m, norms in NORMS.items() if norm in norms and m not in TRAINING_ONLY)


def check_norm(method: str, norm: str) -> None:
    """An InputError unless `method` bounds balls of `norm` (and the norm is known)."""
    if norm not in NORM_NAMES:
        raise InputError(f"unknown norm '{norm}'; choose linf or l2")
    if method in NORMS and norm not in NORMS[method]:
        others = ", ".join(bounding_methods(norm))
        bounds = " and ".join(NORM_NAMES[n] for n in NORMS[method])
        raise InputError(f"method '{method}' bounds {bounds} balls only; for {NORM_NAMES[norm]} use {others}")


GLORO_REFUSAL = ("gloro estimates Lipschitz constants by power iteration, from below: it is for training "
                 "(graphcert train --method gloro); certify with --method lipschitz --norm l2")
ORTHOGONAL_REFUSAL = ("orthogonal builds training graphs whose margin bound trusts the Björck iteration: it is "
                      "for training (graphcert train --method orthogonal); certify with --method lipschitz --norm l2")


def _register_builtin() -> None:
    from graphcert.passes import ibp
    register_method("ibp", lambda input_set, keep_original=True, trainable=False:
                    ibp.IntervalPass(input_set, keep_original=keep_original, trainable=trainable),
                    supports=lambda node: node.op_type in ibp.RULES and ibp.accepts(node))
    from graphcert.passes import crown
    for name, intermediate in (("crown", "crown"), ("crown-ibp", "ibp")):
        register_method(name, lambda input_set, keep_original=True, trainable=False, norm="linf",
                        intermediate=intermediate:
                        crown.CrownPass(input_set, keep_original=keep_original, trainable=trainable,
                                        intermediate=intermediate, norm=norm),
                        supports=crown.supports, norms=("linf", "l2"))
    from graphcert.passes import lipschitz
    register_method("lipschitz", _lipschitz_factory, supports=lipschitz.supports, norms=("l2",),
                    own_objective=True)
    from graphcert.passes import gloro
    register_method("gloro", _gloro_factory, supports=gloro.supports, norms=("l2",), own_objective=True,
                    training_only=GLORO_REFUSAL)
    from graphcert.passes import orthogonal
    register_method("orthogonal", _orthogonal_factory, supports=orthogonal.supports, norms=("l2",),
                    own_objective=True, training_only=ORTHOGONAL_REFUSAL)


def _lipschitz_factory(input_set, keep_original=True, trainable=False, norm="l2", objective=False):
    from graphcert.passes.lipschitz import LipschitzPass
    if trainable:
        raise InputError("lipschitz folds the network's Lipschitz constant into the graph as a number; "
                         "it cannot be trained through: use ibp, crown-ibp or crown")
    return LipschitzPass(input_set, keep_original=keep_original, objective=objective)


def _gloro_factory(input_set, keep_original=True, trainable=False, norm="l2", objective=False):
    from graphcert.passes.gloro import GloroPass
    if not (trainable and objective):
        raise InputError(GLORO_REFUSAL)
    return GloroPass(input_set, keep_original=keep_original)


def _orthogonal_factory(input_set, keep_original=True, trainable=False, norm="l2", objective=False):
    from graphcert.passes.orthogonal import OrthogonalPass
    if not (trainable and objective):
        raise InputError(ORTHOGONAL_REFUSAL)
    return OrthogonalPass(input_set, keep_original=keep_original)


_register_builtin()


def load(source) -> ir.Model:
    """Read and normalise an ONNX model (path, ModelProto or onnx_ir.Model)."""
    return model_lib.load(source)


def bound_graph(model, method: str = "ibp", input_set: InputSet | None = None,
                spec: np.ndarray | str | None = None, spec_offset: np.ndarray | None = None,
                keep_original: bool = True, trainable: bool = False, norm: str = "linf") -> ir.Model:
    """The bound graph of `model` by `method`.

    spec: None bounds the outputs; a [m, n] matrix bounds margins C·y + spec_offset (output `margins`);
    "runtime" adds an `objective` input [batch, m, n] and bounds objective·y.
    norm: "linf" (epsilon is the L-inf radius) or "l2" (epsilon is the L2 radius; crown, crown-ibp, lipschitz).
    """
    if method not in METHODS:
        raise InputError(f"unknown method '{method}'; choose one of: {', '.join(sorted(METHODS))}")
    check_norm(method, norm)
    normalised = model if isinstance(model, ir.Model) else load(model)
    kwargs = {"keep_original": keep_original}
    own_objective = isinstance(spec, str) and method in OWN_OBJECTIVE
    if own_objective:
        kwargs["objective"] = True
    elif spec is not None:
        from graphcert.passes.spec import SpecPass
        matrix = None if isinstance(spec, str) else np.asarray(spec, dtype=np.float32)
        normalised = SpecPass(matrix, spec_offset, keep_output=keep_original)(normalised).model
    factory = METHODS[method]
    if trainable:
        kwargs["trainable"] = True
    if norm != "linf":
        kwargs["norm"] = norm
    return factory(input_set or InputSet(), **kwargs)(normalised).model


def convert(model_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "ibp",
            domain: tuple[float, float] | None = None, spec_path: str | None = None,
            norm: str = "linf") -> onnx.ModelProto:
    """Write the bound graph of a model file (`epsilon` an L-inf or, with norm "l2", an L2 radius); never
    overwrites the input."""
    from .files import refuse_overwrite
    check_norm(method, norm)
    refuse_overwrite([out_path], [model_path, spec_path])
    normalised = load(model_path)
    spec, offset = None, None
    if spec_path is not None:
        from graphcert.vnnlib import load_property
        prop = load_property(spec_path)
        _check_property_fits(prop, normalised, model_path, spec_path)
        spec, offset = prop.stacked_rows()
    bound = bound_graph(normalised, method, InputSet("linf", domain), spec=spec, spec_offset=offset, norm=norm)
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

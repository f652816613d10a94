"""alpha-CROWN: optimise the lower-relaxation slopes of ReLU-like units by gradient to tighten CROWN bounds.

The CROWN bound graph is built with every such slope as an input, one tensor per (backward pass, unit) and
so separate slopes for every bounded row (Xu et al., ICLR 2021). Adam on the PyTorch executor maximises the
sum of the lower bounds (and minimises the CROWN upper bounds), projecting the slopes onto [0, 1] after each
step (the graph itself pins the slopes of stable units). Slopes start at CROWN's adaptive choice, and the
best bound seen for each element is kept, so the result is never looser than CROWN.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from . import model as model_lib
from .errors import InputError
from .export import to_proto
from .interface import InputSet, perturbed_inputs
from .runtime import Session


def alpha_crown_bounds(model, kind: str = "linf", lower=None, upper=None, x=None, eps=None,
                       domain: tuple[float, float] | None = None, spec=None, spec_offset=None,
                       iterations: int = 20, lr: float = 0.1, crown_upper: bool | None = None,
                       stop: Callable[[np.ndarray, np.ndarray], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the first model output, or of margins spec·y + spec_offset when spec is given.

    The input set is a box (`kind="box"`, `lower`/`upper` shaped like the model input with its batch) or an
    L-inf ball (`kind="linf"`, centre `x`, radius `eps`, clipped to `domain`). `crown_upper` as in
    `passes.crown.CrownPass` (by default margins get IBP upper bounds). `stop(lower, upper)` may end the
    optimisation early (e.g. once a property is proved).
    """
    from graphcert.passes.crown import ALPHA_INIT_PREFIX, CrownPass
    from graphcert.passes.spec import SpecPass

    normalised = model if isinstance(model, ir.Model) else model_lib.load(model)
    if spec is not None:
        normalised = SpecPass(np.asarray(spec, dtype=np.float32), spec_offset, keep_output=False)(normalised).model
    else:
        normalised = _first_output_only(normalised)
    output = normalised.graph.outputs[0].name
    input_set = InputSet(kind, domain)
    feeds = _feeds(normalised, kind, lower, upper, x, eps)
    names = [f"{output}_lower", f"{output}_upper"]

    plain = CrownPass(input_set, keep_original=False, crown_upper=crown_upper, alpha="init")(normalised).model
    session = Session(to_proto(plain))
    found = session.run(feeds)
    best_lower, best_upper = found[names[0]], found[names[1]]
    if iterations <= 0 or (stop is not None and stop(best_lower, best_upper)):
        return best_lower, best_upper

    from graphcert.torch_exec import TorchGraph
    tuned = CrownPass(input_set, keep_original=False, crown_upper=crown_upper, alpha="inputs")(normalised).model
    units = json.loads(tuned.metadata_props.get("graphcert.alpha", "{}"))
    if not units:  # no ReLU-like unit: nothing to optimise
        return best_lower, best_upper
    alphas = {}
    for value in tuned.graph.inputs:
        if value.name in units:
            start = found[ALPHA_INIT_PREFIX + units[value.name]]
            rows = value.shape[0]
            alphas[value.name] = torch.tensor(np.broadcast_to(start, (rows, *start.shape)).copy(), requires_grad=True)
    graph = TorchGraph(tuned, trainable=False)
    torch_feeds = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in feeds.items()}
    optimiser = torch.optim.Adam(list(alphas.values()), lr=lr)
    for _ in range(iterations):
        bounds = graph({**torch_feeds, **alphas}, outputs=names)
        low, high = bounds[names[0]], bounds[names[1]]
        best_lower = np.maximum(best_lower, low.detach().numpy())
        best_upper = np.minimum(best_upper, high.detach().numpy())
        if stop is not None and stop(best_lower, best_upper):
            break
        loss = high.sum() - low.sum() if high.requires_grad else -low.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for alpha in alphas.values():
                alpha.clamp_(0.0, 1.0)
    return best_lower, best_upper


def _first_output_only(model: ir.Model) -> ir.Model:
    from graphcert.interface import clone
    copy = clone(model)
    del copy.graph.outputs[1:]
    return copy


def _feeds(model: ir.Model, kind: str, lower, upper, x, eps) -> dict[str, np.ndarray]:
    (source,) = perturbed_inputs(model) if len(perturbed_inputs(model)) == 1 else (None,)
    if source is None:
        raise InputError("alpha-CROWN bounds models with one input")
    if kind == "box":
        if lower is None or upper is None:
            raise InputError("a box input set needs lower and upper")
        return {f"{source.name}_lower": np.asarray(lower, np.float32), f"{source.name}_upper": np.asarray(upper, np.float32)}
    if x is None or eps is None:
        raise InputError("an L-inf input set needs x and eps")
    return {source.name: np.asarray(x, np.float32), "epsilon": np.asarray(eps, np.float32)}

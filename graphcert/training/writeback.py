"""Mapping trained parameters to the original ONNX model and writing them back into it.

Training runs on the normalised model, whose weights keep the original initializer names. A weight is
trainable when the original model holds it under the same name (as an initializer or a Constant node)
with the same shape and values; weights the normaliser derived (folded constants) stay frozen, which keeps
the original graph and the trained one consistent. Write-back replaces those values and nothing else:
same nodes, same names, same opset. Methods that train a reparametrisation (orthogonal) write the weights the
training graph computed from the parameters, not the parameters themselves.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from graphcert.errors import InputError


def original_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float tensors of the original graph by name: initializers and Constant-node outputs."""
    found = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return {name: array for name, array in found.items() if np.issubdtype(array.dtype, np.floating)}


def trainable_names(proto: onnx.ModelProto, normalised: ir.Model) -> list[str]:
    originals = original_weights(proto)
    names = []
    for name, value in normalised.graph.initializers.items():
        if value.const_value is None or name not in originals:
            continue
        array = value.const_value.numpy()
        original = originals[name]
        if array.ndim >= 1 and array.shape == original.shape and np.array_equal(array, original):
            names.append(name)
    if not names:
        raise InputError("the model has no float weights that training can write back (no initializer of the "
                         "original model survives normalisation unchanged)")
    return names


def deployed_weights(method: str, normalised: ir.Model, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights the deployed model carries: the trained ones, except that methods which reparametrise
    weights in the training graph (orthogonal: W -> Björck(W)) map them through that reparametrisation."""
    if method == "orthogonal":
        from graphcert.passes.orthogonal import deployable_weights
        return deployable_weights(normalised, trained)
    return trained


def write_back(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `proto` with the named weights replaced (dtype and shape of the originals kept)."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    pending = dict(arrays)
    for init in result.graph.initializer:
        if init.name in pending:
            init.CopyFrom(_tensor(pending.pop(init.name), init))
    for node in result.graph.node:
        if node.op_type == "Constant" and node.output[0] in pending:
            for attribute in node.attribute:
                if attribute.name == "value":
                    attribute.t.CopyFrom(_tensor(pending.pop(node.output[0]), attribute.t))
    if pending:
        raise InputError(f"trained weight(s) {sorted(pending)[:5]} are not in the original model")
    return result


def _tensor(array: np.ndarray, like: onnx.TensorProto) -> onnx.TensorProto:
    original = numpy_helper.to_array(like)
    array = np.asarray(array)
    if array.shape != original.shape:
        raise InputError(f"trained weight {like.name!r} has shape {array.shape}, the model expects {original.shape}")
    return numpy_helper.from_array(array.astype(original.dtype), like.name)

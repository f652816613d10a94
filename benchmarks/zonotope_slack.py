"""The float32 slack of a VNN-LIB property's box and of smaller boxes around its centre: the model's error
as a zonotope (graphcert.rounding_zonotope) beside the interval analysis, with the bound graph in float64 and
float32, against CROWN's margins. Shows where verify's float32 mode can prove what real arithmetic proves.

    python benchmarks/zonotope_slack.py MODEL.onnx PROPERTY.vnnlib [--fractions 1e-3 0.5 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from graphcert.precision import FLOAT64
from graphcert.rounding_slack import RoundingSlack
from graphcert.verify.bounds import SplitBounds
from graphcert.verify.network import Network
from graphcert.verify.search import Search
from graphcert.vnnlib import load_property


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("spec")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1e-3, 0.067, 0.5, 1.0],
                        help="box radii as fractions of the property's first box")
    args = parser.parse_args()
    prop, network = load_property(args.spec), Network(args.model)
    search = Search(prop, network, time.monotonic() + 3600)
    lower, upper, _ = prop.root_boxes()
    centre, half = (lower[0] + upper[0]) / 2, (upper[0] - lower[0]) / 2
    splits = SplitBounds(network, search.matrix, search.offset, "clamp")
    slack64 = RoundingSlack(network.model, given=splits.names, bound_arithmetic=FLOAT64)
    slack32 = RoundingSlack(network.model, given=splits.names)
    print("fraction  unstable  min margin  zonotope (f64 graph)  interval (f64 graph)  interval (f32 graph)  zonotope s")
    for fraction in args.fractions:
        lo = np.maximum(lower[0], centre - fraction * half).astype(np.float32)[None]
        hi = np.minimum(upper[0], centre + fraction * half).astype(np.float32)[None]
        unbounded = np.full((1, splits.units), np.inf, np.float32)
        margins, unit_lower, unit_upper = splits(lo, hi, -unbounded, unbounded)
        given = splits.per_layer(np.minimum(unit_lower, unit_upper), np.maximum(unit_lower, unit_upper))
        x_lo, x_hi = network.model_shaped(lo), network.model_shaped(hi)
        began = time.monotonic()
        zonotope = slack64.of_rows(x_lo, x_hi, search.matrix[None], given=given, zonotope=True).max()
        seconds = time.monotonic() - began
        interval64 = slack64.of_rows(x_lo, x_hi, search.matrix[None], given=given).max()
        interval32 = slack32.of_rows(x_lo, x_hi, search.matrix[None], given=given).max()
        unstable = int(((unit_lower < 0) & (unit_upper > 0)).sum())
        print(f"{fraction:8.3g}  {unstable:8d}  {margins.min():10.4g}  {zonotope:20.4g}  {interval64:20.4g}  "
              f"{interval32:20.4g}  {seconds:10.2f}")


if __name__ == "__main__":
    main()

"""Optimised intermediate bounds: alpha-CROWN on every split layer's input z in turn, each layer's bounds its own
objective, before the margins.

`AlphaUnitBounds` optimises every pass's slopes for the margins alone: an intermediate unit's bounds only tighten
as far as that helps the margins' gradient, which on deep nets of S-shaped units barely moves them. Here the
bounds of z_k are the objective of their own optimisation (the model cut at z_k, both bounds, CROWN's lines of
the earlier layers given as the bounds already found for them, split mode "given"), layer after layer, so that
each layer is relaxed on the tightest intervals found for the layers before it. On eran's 6x200 sigmoid net
(idx 1211, eps 0.012) CROWN's layer-5 intervals average over 100 wide, and the margins' alpha-CROWN (200
steps) leaves them 35 wide and the margins at -25 to -46; layer by layer (20 steps each at most) they average
10 and every margin is positive.

Every bound is a CROWN bound for some slopes in their valid range on intervals that hold (those of earlier
layers, found the same way), so each is sound; each layer keeps the intersection with what it was given.
"""
from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..alpha import AlphaCrown, AlphaSettings
from ..interface import clone
from ..precision import outward
from .bounds import SplitBounds, outward_float32
from .network import Network
from .resources import log

# A layer's optimisation stops once the summed width of its intervals shrank by less than PLATEAU[1] of itself
# over the last PLATEAU[0] steps.
PLATEAU = (4, 0.01)


def cut_at(model: ir.Model, name: str) -> ir.Model:
    """The model computing only the tensor `name` (its one output; nodes it does not need removed)."""
    cut = clone(model)
    value = next(v for node in cut.graph for v in node.outputs if v.name == name)
    cut.graph.outputs.clear()
    cut.graph.outputs.append(value)
    return RemoveUnusedNodesPass()(cut).model


class WidthPlateau:
    """A stop rule for `AlphaCrown.bounds` on both bounds of a tensor: true once the summed width gained less
    than `share` of itself over the last `window` steps, or past `deadline`."""

    def __init__(self, window: int, share: float, deadline: float):
        self.window, self.share, self.deadline, self.history = window, share, deadline, []

    def __call__(self, lower: np.ndarray, upper: np.ndarray) -> bool:
        width = np.nan_to_num(upper.astype(np.float64) - lower, nan=np.inf, posinf=np.inf).sum()
        self.history.append(width)
        if time.monotonic() > self.deadline:
            return True
        if len(self.history) <= self.window or not np.isfinite(width):
            return False
        return bool(self.history[-1 - self.window] - width < self.share * width)


class LayerwiseUnitBounds:
    """Bounds of every split unit's input z over input boxes, each layer optimised for its own bounds, then the
    margins on them. Same result as `AlphaUnitBounds`: margin lower bounds [B, rows] and bounds [B, units] of z
    (flattened as in `splits`), never looser than those given."""

    def __init__(self, network: Network, matrix: np.ndarray, offset: np.ndarray, splits: SplitBounds,
                 settings: AlphaSettings, double: bool = False):
        self.network, self.splits, self.settings, self.double = network, splits, settings, double
        self.matrix, self.offset = np.asarray(matrix, dtype=np.float32), offset
        self._layers: dict[int, AlphaCrown] = {}
        self._margins: AlphaCrown | None = None

    def _layer(self, k: int) -> AlphaCrown:
        if k not in self._layers:
            cut = cut_at(self.network.bound_model, self.splits.names[k])
            self._layers[k] = self._prepared(AlphaCrown(cut, "box", crown_upper=True, split_bounds="given"))
        return self._layers[k]

    def _margin_bounder(self) -> AlphaCrown:
        if self._margins is None:
            self._margins = self._prepared(AlphaCrown(self.network.bound_model, "box", spec=self.matrix,
                                                      spec_offset=self.offset, split_bounds="given"))
        return self._margins

    def _prepared(self, bounder: AlphaCrown) -> AlphaCrown:
        if self.double:
            bounder.in_double()
        return bounder

    def __call__(self, lower, upper, stop, unit_lower=None, unit_upper=None, deadline: float = np.inf):
        """Bounds of the boxes (lower, upper [B, n]) given sound bounds of z (unit_lower, unit_upper [B, units];
        None: none); `stop` ends the margins' steps (as `AlphaCrown.bounds`'); layers past `deadline` keep what
        was given."""
        splits, settings = self.splits, self.settings
        lo, hi = outward_float32(lower, upper)
        lo, hi = self.network.model_shaped(lo), self.network.model_shaped(hi)
        unbounded = np.full((len(lo), splits.units), np.inf, dtype=np.float32)
        unit_lower = -unbounded if unit_lower is None else unit_lower.astype(np.float32)
        unit_upper = unbounded if unit_upper is None else unit_upper.astype(np.float32)
        for k in range(len(splits.names)):
            if time.monotonic() > deadline:
                log.info("layer-by-layer bounds stopped at layer %d of %d (deadline)", k, len(splits.names))
                break
            part = slice(splits.offsets[k], splits.offsets[k + 1])
            bounder = self._layer(k)
            feeds = _feeds(bounder, lo, hi, splits.split_feeds(unit_lower, unit_upper))
            plateau = WidthPlateau(*PLATEAU, deadline)
            found_lower, found_upper = bounder.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay,
                                                      stop=plateau)
            found_lower = outward("lower", found_lower).reshape(len(lo), -1)
            found_upper = outward("upper", found_upper).reshape(len(lo), -1)
            unit_lower[:, part] = np.maximum(unit_lower[:, part], found_lower)
            unit_upper[:, part] = np.minimum(unit_upper[:, part], found_upper)
            log.info("layer %d of %d: mean width %.4g after %d steps", k + 1, len(splits.names),
                     float(np.mean(unit_upper[:, part].astype(np.float64) - unit_lower[:, part])), len(plateau.history))
        bounder = self._margin_bounder()
        feeds = _feeds(bounder, lo, hi, splits.split_feeds(unit_lower, unit_upper))
        low, _ = bounder.bounds(feeds, settings.iterations, settings.lr, settings.lr_decay, stop=stop)
        return outward("lower", low).reshape(len(lo), -1), unit_lower, unit_upper


def _feeds(bounder: AlphaCrown, lower: np.ndarray, upper: np.ndarray, splits: dict[str, np.ndarray]) -> dict:
    """The box and those split bounds the bounder's graph takes (a cut model takes its earlier layers' only)."""
    takes = bounder.inputs
    return {name: value for name, value in {**bounder.feeds(lower=lower, upper=upper), **splits}.items()
            if name in takes}

"""Facts about the floating-point arithmetics a model or a bound graph runs in, for the rounding analysis.

Every rule of graphcert.rounding uses the standard model of floating-point arithmetic with gradual underflow
(Higham, ch. 2): an operation's computed result is (exact)·(1 + δ) + η with |δ| <= u and |η| <= `underflow`
(η = 0 for additions), as long as no magnitude reaches `largest` (beyond it the result may be ±inf). u and
η are what set the arithmetics apart: float16's u is 2^13 times float32's, and its subnormal step, 2^-24, is far
above float32's.

Half-precision models store every value in float16 (or bfloat16) but runtimes accumulate sums and products in
float32 and round each op's result once: onnxruntime's CPU MatMul and Gemm on float16 match float32
accumulation rounded to float16 on 99.9 % of outputs, and pure float16 accumulation on 5-9 % (784-term dot
products). That is the arithmetic analysed (`accumulator`); a runtime that accumulates in float16 is not
covered (its worst-case error on a 784-term sum is 62 % of the sum of magnitudes: no certificate survives it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arithmetic:
    name: str
    unit: float        # unit roundoff u: half the distance from 1 to the next number
    underflow: float   # largest absolute error of one rounding below the normal range (half the smallest subnormal)
    largest: float     # the largest finite number
    accumulator: float | None = None   # u of the arithmetic sums and products run in inside an op, if wider

    def gamma(self, n: int) -> float:
        """The relative error bound of an op that chains n roundings (a sum or dot product of n terms): γ_n =
        n·u / (1 - n·u), or with a wider accumulator one final rounding of the accumulated γ_n."""
        if self.accumulator is None:
            return n * self.unit / (1.0 - n * self.unit)
        accumulated = n * self.accumulator / (1.0 - n * self.accumulator)
        return (1.0 + accumulated) * (1.0 + self.unit) - 1.0


ARITHMETICS = {a.name: a for a in (
    Arithmetic("float32", 2.0 ** -24, 2.0 ** -150, 3.4028234663852886e38),
    Arithmetic("float16", 2.0 ** -11, 2.0 ** -25, 65504.0, accumulator=2.0 ** -24),
    Arithmetic("bfloat16", 2.0 ** -8, 2.0 ** -134, 3.3895313892515355e38, accumulator=2.0 ** -24),
    Arithmetic("float64", 2.0 ** -53, 2.0 ** -1075, 1.7976931348623157e308),
)}
FLOAT32 = ARITHMETICS["float32"]


def of_model(model) -> Arithmetic:
    """The arithmetic a loaded model runs in when deployed: float16 and bfloat16 models are widened to float32
    when loaded (graphcert.dtypes) but run in their own type; a float64 model is narrowed to float32 and
    analysed as a float32 model with one more rounding per weight (graphcert.rounding's weight_rounding)."""
    from .dtypes import META
    loaded_from = model.metadata_props.get(META)
    return ARITHMETICS[loaded_from] if loaded_from in ("float16", "bfloat16") else FLOAT32

"""How alpha-CROWN optimises (`AlphaSettings`) and the defaults of certify and verify.

Apart from `graphcert.alpha` so that the command line can show these defaults without loading onnx or torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class AlphaSettings:
    """How alpha-CROWN optimises: at most `iterations` Adam steps at learning rate `lr` (times `lr_decay` after
    each step); `give_up` also stops when the bound cannot reach the goal at its recent rate (`ProofWatch`)."""
    iterations: int = 20
    lr: float = 0.1
    lr_decay: float = 0.98
    give_up: bool = False

    def __post_init__(self):
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise InputError(f"alpha-CROWN iterations must be a whole number >= 0, got {self.iterations}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"alpha-CROWN learning rate must be a positive number, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise InputError(f"alpha-CROWN learning-rate decay must be in (0, 1], got {self.lr_decay}")


# Properties often need more than 20 steps to prove; giving up on hopeless bounds keeps that affordable.
VERIFY_ALPHA = AlphaSettings(iterations=60, give_up=True)
# Certify gives up on each sample by its own history: on the MNIST CNN (100 images, eps 0.03) the same 85 % in
# 42 s instead of 248 s.
CERTIFY_ALPHA = AlphaSettings(give_up=True)
# verify re-bounds ReLU split domains with alpha-beta-CROWN for at most this many steps, giving up early. Children
# start from their parent's optimised slopes and multipliers, so few steps go far; more domains per second pay
# more than more steps per domain (60 s, in-process, 2026-12-06: 20 / 10 / 5 steps: eran relu idx 186 holds in
# 51.8 / 41.3 / 33.4 s, idx 6998 in 12.9 / 11.7 / 14.3 s; mnistfc 256x4 prop_0_0.03 times out / holds in 42.3 /
# 46.1 s; 256x2 prop_0_0.03 and prop_9_0.03 about 4 s at 20 and 10; 256x2 prop_3_0.03 times out at all three).
BRANCH_BETA = AlphaSettings(iterations=10, give_up=True)

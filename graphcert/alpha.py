"""alpha-CROWN: optimise the lower-relaxation slopes of ReLU-like units by gradient to tighten CROWN bounds.

The CROWN bound graph is built with every such slope as an input, one tensor per (backward pass, unit) and
so separate slopes for every bounded row (Xu et al., ICLR 2021). Adam on the PyTorch executor maximises the
sum of the lower bounds (and minimises the CROWN upper bounds), projecting the slopes onto [0, 1] after each
step (the graph itself pins the slopes of stable units). Slopes start at CROWN's adaptive choice, and the
best bound seen for each element is kept, so the result is never looser than CROWN.

Mixtures serve disjunctions, as in a VNN-LIB conjunct refuted as soon as any one of its margins is positive: a
convex combination sum_j lambda_j·m_j of those margins is at most their maximum, so a positive lower bound on
it refutes the conjunct even when no single margin's bound is positive. The weights lambda (a softmax, starting
uniform) are learned together with the slopes, a Lagrangian view of the disjunction.

beta-CROWN (Wang et al., NeurIPS 2021) serves ReLU split domains: with `split_bounds` and `beta`, the graph also
takes a multiplier >= 0 per (row, domain, split unit) of each split constraint s·z >= 0 (`passes.crown.CrownPass`),
optimised with the slopes from 0 (the plain bound) and projected back onto >= 0 after each step.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import onnx_ir as ir

from . import model as model_lib
from .alpha_settings import CERTIFY_ALPHA, VERIFY_ALPHA, AlphaSettings  # noqa: F401  (re-exported)
from .errors import InputError
from .interface import OBJECTIVE, InputSet, clone, perturbed_inputs

Stop = Callable[[np.ndarray, np.ndarray], bool]


class AlphaCrown:
    """alpha-CROWN for one model, input-set kind and spec; the graph is built once for many input sets, and runs
    in torch: its start (the switch ALPHA_START on: CROWN's own slopes, `passes.crown`), then the steps.

    spec: None bounds the first model output; a [m, n] matrix (with spec_offset) bounds margins; "runtime"
    bounds objective·y for an `objective` fed with every call (shape [batch, m, n]).
    crown_upper: as in `passes.crown.CrownPass` (by default margins get IBP upper bounds).
    split_bounds, beta: as in `passes.crown.CrownPass`; the feeds then include the split clamps (and signs).
    intermediate_rows: as in `passes.crown.CrownPass` (only some units' bounds computed and optimised).
    """

    def __init__(self, model, kind: str = "linf", domain: tuple[float, float] | None = None, spec=None,
                 spec_offset=None, crown_upper: bool | None = None, norm: str = "linf",
                 split_bounds: str | None = None, beta: bool = False,
                 intermediate_rows: dict[str, np.ndarray] | None = None):
        from graphcert.passes.crown import LINEAR_LOWER_PREFIX, LINEAR_UPPER_PREFIX, CrownPass
        from graphcert.passes.spec import SpecPass

        normalised = model if isinstance(model, ir.Model) else model_lib.load(model)
        if spec is not None:
            matrix = None if isinstance(spec, str) else np.asarray(spec, dtype=np.float32)
            normalised = SpecPass(matrix, spec_offset, keep_output=False)(normalised).model
        else:
            normalised = clone(normalised)
            del normalised.graph.outputs[1:]
        sources = perturbed_inputs(normalised)
        if len(sources) != 1:
            raise InputError(f"alpha-CROWN bounds models with one input, this one has {len(sources)}")
        self.source = sources[0].name
        self.kind = kind
        output = normalised.graph.outputs[0].name
        self.outputs = [f"{output}_lower", f"{output}_upper"]
        input_set = InputSet(kind, domain)
        tuned = CrownPass(input_set, keep_original=False, crown_upper=crown_upper, alpha="inputs",
                          norm=norm, split_bounds=split_bounds, beta=beta,
                          intermediate_rows=intermediate_rows)(normalised).model
        self.units: dict[str, str] = json.loads(tuned.metadata_props.get("graphcert.alpha", "{}"))
        self.betas: dict[str, str] = json.loads(tuned.metadata_props.get("graphcert.beta", "{}"))
        self.rows = {v.name: v.shape[0] for v in tuned.graph.inputs if v.name in self.units or v.name in self.betas}
        # What the steps follow: the linear bounds before they meet IBP's (`passes.crown.LINEAR_LOWER_PREFIX`),
        # where the graph gives them; else the bounds themselves.
        given = {v.name for v in tuned.graph.outputs}
        self.steered = [name if name in given else fallback for name, fallback in
                        ((LINEAR_LOWER_PREFIX + output, self.outputs[0]), (LINEAR_UPPER_PREFIX + output, self.outputs[1]))]
        self._tuned = tuned
        self._executor = self._double_executor = None
        self.dtype = "float32"   # "float64": the bounds' own rounding is then negligible (verify's float32 mode)
        self.kept: dict[str, np.ndarray] | None = None   # `bounds(..., keep=True)` fills it
        self.tracked: dict[str, np.ndarray] = {}          # `bounds(..., track=...)` fills it

    @property
    def inputs(self) -> set[str]:
        """The names of the graph's inputs (box or ball, objective, split clamps, slopes, multipliers)."""
        return {value.name for value in self._tuned.graph.inputs}

    def in_double(self) -> None:
        """Give every bound computed in float64 from now on (float64 arrays). The Adam steps still run in
        float32, whose bounds only steer them: the bounds returned are the CROWN start's and those of the best
        parameters found, each evaluated in float64 (any parameters in range give a sound bound, so the steps'
        own rounding does not matter)."""
        self.dtype = "float64"

    def feeds(self, lower=None, upper=None, x=None, eps=None, objective=None) -> dict[str, np.ndarray]:
        """Graph inputs for a box (lower, upper) or an L-inf ball (x, eps), shaped like the model input."""
        if self.kind == "box":
            if lower is None or upper is None:
                raise InputError("a box input set needs lower and upper")
            found = {f"{self.source}_lower": lower, f"{self.source}_upper": upper}
        else:
            if x is None or eps is None:
                raise InputError("an L-inf input set needs x and eps")
            found = {self.source: x, "epsilon": eps}
        if objective is not None:
            found[OBJECTIVE] = objective
        return {k: np.array(v, dtype=np.float32) for k, v in found.items()}

    def bounds(self, feeds: dict[str, np.ndarray], iterations: int = 20, lr: float = 0.1, lr_decay: float = 0.98,
               stop: Stop | None = None, offset: np.ndarray | None = None,
               mixtures: list[np.ndarray] | None = None, mixture_lr: float = 0.5,
               beta_lr: float | None = None, start: dict[str, np.ndarray] | None = None,
               keep: bool = False, track: tuple[tuple[str, str], ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) after up to `iterations` Adam steps (learning rate `lr`, `beta_lr` for beta multipliers
        (default `lr`), times `lr_decay` after each); `stop(lower, upper)` may end them early.

        Warm start: `start` maps slope and multiplier inputs (`parameter_shapes`) to values [rows, batch, ...]
        to start from instead of CROWN's slopes and beta = 0 (NaN entries keep those); any value gives a sound
        bound, the graph projecting slopes onto their range and the steps keeping beta >= 0. A start with every
        parameter and no NaN (and no mixtures) skips CROWN's start: the bounds (tracked ones too) are the steps'.
        With `keep`, `self.kept` then holds the parameters of each batch element's step with the largest summed
        lower bound (its warm start for a sub-problem).

        `track` names pairs (lower, upper) of further graph outputs, bounds of some tensor (with `split_bounds`
        "clamp": `clamped_lower.<z>`, `clamped_upper.<z>`, the intermediate bounds); `self.tracked` then holds
        the tightest of each seen over the steps (every step's slopes give sound bounds, so their intersection
        is one too): the slopes of intermediate passes follow the gradient of the output bounds through them.

        With a run-time objective [batch, m, n]: `offset` ([m]) is added to every row's bounds, and each entry
        of `mixtures` (indices of objective rows) appends a column [batch] bounding from below a learned convex
        combination of those rows (offsets included); its upper column is that of the uniform combination.
        """
        from graphcert.passes.crown import ALPHA_INIT_PREFIX, SPLIT_SIGN_PREFIX

        mixer = _Mixer(feeds.get(OBJECTIVE), offset, mixtures or [])
        feeds = mixer.initial_feeds(feeds)
        parameters = [*self.units, *self.betas]
        # A warm start that gives every parameter needs no CROWN start: its slopes would all be replaced, and a
        # caller that warm-starts has bounds to fall back on (branch and bound: the parent's, or CROWN's of the
        # children). The bounds are then those of the steps alone (in float64 mode the best step's, evaluated).
        best_lower = best_upper = None
        if iterations > 0 and parameters and not mixer.groups and start is not None \
                and set(parameters) <= set(start) and all(np.isfinite(start[name]).all() for name in parameters):
            initial = {name: np.asarray(value, dtype=np.float32) for name, value in start.items()}
            self.tracked = {}
        else:
            found = self.crown_start(feeds, [name for pair in track for name in pair])
            best_lower, best_upper = mixer.shift(found[self.outputs[0]]), mixer.shift(found[self.outputs[1]])
            self.tracked = {name: np.array(found[name]) for pair in track for name in pair}
            initial = {}
            for name, unit in self.units.items():
                slopes = found[ALPHA_INIT_PREFIX + unit].astype(np.float32)   # the steps run in float32
                initial[name] = np.broadcast_to(slopes, (self._rows(name, feeds), *slopes.shape))
            for name, unit in self.betas.items():
                initial[name] = np.zeros((self._rows(name, feeds), *feeds[SPLIT_SIGN_PREFIX + unit].shape),
                                         np.float32)
            for name, given in (start or {}).items():
                initial[name] = np.where(np.isnan(given), initial[name], given).astype(np.float32)
        self.kept = {name: np.array(value, dtype=np.float32) for name, value in initial.items()} if keep else None
        if best_lower is not None and (iterations <= 0 or not (self.units or self.betas or mixer.groups)
                                       or (stop is not None and stop(best_lower, best_upper))):
            return best_lower, best_upper

        import torch
        from graphcert.passes.crown import ALPHA_START
        executor = self._torch_graph()
        alphas = {name: torch.tensor(initial[name], requires_grad=True) for name in self.units}
        betas = {name: torch.tensor(initial[name], requires_grad=True) for name in self.betas}
        batch = len(best_lower) if best_lower is not None else next(iter(initial.values())).shape[1]
        kept_score = np.full(batch, -np.inf)
        # float64 answers (`in_double`): the float32 steps' bounds only steer; the parameters of each batch
        # element's best step are evaluated in float64 at the end.
        answer_in_double = self.dtype == "float64"
        if answer_in_double:
            answers = (best_lower, best_upper, {name: value.copy() for name, value in self.tracked.items()})
            steering = {name: np.array(value, dtype=np.float32) for name, value in initial.items()}
            steer_score = np.full(batch, -np.inf)
        torch_feeds = {k: torch.as_tensor(v) for k, v in feeds.items()}
        torch_feeds[ALPHA_START] = torch.tensor(False)   # the steps' own slopes
        optimiser = Adam([(list(alphas.values()), lr), (list(betas.values()), lr if beta_lr is None else beta_lr),
                          (mixer.parameters(), mixture_lr)], lr_decay)
        # The steps change only the parameters (and a learned mixture's objective): what depends on the boxes
        # alone is computed once.
        varying = set(alphas) | set(betas) | ({OBJECTIVE} if mixer.groups else set())
        step_graph = executor.bind(torch_feeds, varying, list(dict.fromkeys(
            self.outputs + self.steered + [name for pair in track for name in pair])))
        for _ in range(iterations):
            objective, shift = mixer.objective()
            step_feeds = {**alphas, **betas}
            if objective is not None:
                step_feeds[OBJECTIVE] = torch_feeds[OBJECTIVE] = objective
            result = step_graph(step_feeds)
            low, high = result[self.outputs[0]] + shift, result[self.outputs[1]]
            steer_low, steer_high = _finite(result[self.steered[0]] + shift), _finite(result[self.steered[1]])
            self.tracked = _tightest(self.tracked, result, track)
            if best_lower is None:   # no CROWN start: the first step's bounds
                best_lower, best_upper = low.detach().numpy(), high.detach().numpy()
            best_lower = np.maximum(best_lower, low.detach().numpy())
            if not mixer.groups:  # a learned mixture's upper bound would belong to another function each step
                best_upper = np.minimum(best_upper, high.detach().numpy())
            if keep:
                kept_score = self._keep_best(low.detach().numpy(), kept_score, {**alphas, **betas}, self.kept)
            if answer_in_double:
                steer_score = self._keep_best(low.detach().numpy(), steer_score, {**alphas, **betas}, steering)
            if stop is not None and stop(best_lower, best_upper):
                break
            loss = steer_high.sum() - steer_low.sum() if steer_high.requires_grad and not mixer.groups \
                else -mixer.objective_sum(steer_low)
            optimiser.step(loss)
            with torch.no_grad():
                for alpha in alphas.values():
                    alpha.clamp_(0.0, 1.0)
                for beta in betas.values():
                    beta.clamp_(min=0.0)
        if answer_in_double:
            return self._answer_in_double(torch_feeds, steering, mixer, track, answers)
        return best_lower, best_upper

    def crown_start(self, feeds: dict[str, np.ndarray], tracked: list[str] = ()) -> dict[str, np.ndarray]:
        """The graph's outputs with CROWN's own slopes and beta = 0 (the bounds, the slopes `alpha_init.<unit>`,
        the `tracked` outputs), in float64 after `in_double`: the start of the steps."""
        import torch

        from graphcert.passes.crown import ALPHA_INIT_PREFIX, ALPHA_START
        double = self.dtype == "float64"
        dtype = torch.float64 if double else torch.float32
        by_name = {value.name: value for value in self._tuned.graph.inputs}
        start = {name: torch.as_tensor(value, dtype=dtype) if value.dtype.kind == "f" else torch.as_tensor(value)
                 for name, value in feeds.items()}
        start[ALPHA_START] = torch.tensor(True)
        # The fed slopes are ignored with the switch on; multipliers start at 0, where the bounds are those of
        # the graph without them. Zeros that broadcast stand in for both.
        for name in [*self.units, *self.betas]:
            start[name] = torch.zeros((1,) * len(by_name[name].shape), dtype=dtype)
        outputs = list(dict.fromkeys(self.outputs + [ALPHA_INIT_PREFIX + unit for unit in self.units.values()] +
                                     list(tracked)))
        with torch.no_grad():
            found = self._torch_graph(double=double)(start, outputs=outputs)
        return {name: value.numpy() for name, value in found.items()}

    def _answer_in_double(self, torch_feeds: dict, parameters: dict, mixer: "_Mixer", track: tuple,
                          answers: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The tighter of the float64 start (`answers`: lower, upper, tracked) and the bounds of `parameters`
        evaluated in float64 (slopes projected onto their range by the graph, multipliers kept >= 0)."""
        import torch
        start_lower, start_upper, start_tracked = answers   # lower and upper None: no start to compare
        objective, shift = mixer.objective()
        feeds = {k: v.to(torch.float64) for k, v in torch_feeds.items()}
        if objective is not None:
            feeds[OBJECTIVE] = objective.detach().to(torch.float64)
        feeds.update({name: torch.as_tensor(value, dtype=torch.float64) for name, value in parameters.items()})
        with torch.no_grad():
            result = self._torch_graph(double=True)(feeds, outputs=self.outputs + [n for pair in track for n in pair])
        shift = shift.detach().to(torch.float64) if torch.is_tensor(shift) else shift
        low, high = (result[self.outputs[0]] + shift).numpy(), result[self.outputs[1]].numpy()
        self.tracked = _tightest(start_tracked, result, track)
        if start_lower is None:
            return low, high
        lower = np.maximum(start_lower, low)
        upper = start_upper if mixer.groups else np.minimum(start_upper, high)
        return lower, upper

    @staticmethod
    def _keep_best(low: np.ndarray, kept_score: np.ndarray, parameters: dict, into: dict) -> np.ndarray:
        """Keep in `into` the parameters (batch axis 1) of the batch elements whose summed lower bound improved."""
        score = np.nan_to_num(low.reshape(len(low), -1).astype(np.float64), nan=-1e30, neginf=-1e30).sum(axis=1)
        improved = score > kept_score
        if improved.any():
            for name, value in parameters.items():
                into[name][:, improved] = value.detach().numpy()[:, improved]
        return np.where(improved, score, kept_score)

    def parameter_shapes(self, rows: int | None = None) -> dict[str, tuple[int, tuple[int, ...]]] | None:
        """Each slope and multiplier input's (rows, per-sample shape), the batch axis (1) left out; None when
        one is known at run time only. `rows`: the row count of a run-time objective (spec "runtime") that every
        call will feed, standing in for the graph's free row dimension."""
        shapes = {}
        for value in self._tuned.graph.inputs:
            if value.name in self.units or value.name in self.betas:
                dims = list(value.shape)
                if rows is not None and not isinstance(dims[0], int):
                    dims[0] = rows
                if not all(isinstance(d, int) for d in [dims[0], *dims[2:]]):
                    return None
                shapes[value.name] = (dims[0], tuple(dims[2:]))
        return shapes

    def _rows(self, name: str, feeds: dict[str, np.ndarray]) -> int:
        """The rows of a slope or multiplier input: fixed by the graph, or those of the run-time objective."""
        rows = self.rows[name]
        return rows if isinstance(rows, int) else feeds[OBJECTIVE].shape[1]

    def _torch_graph(self, double: bool = False):
        from graphcert.torch_exec import TorchGraph
        import torch
        if double:
            if self._double_executor is None:
                self._double_executor = TorchGraph(self._tuned, trainable=False, dtype=torch.float64)
            return self._double_executor
        if self._executor is None:
            self._executor = TorchGraph(self._tuned, trainable=False, dtype=torch.float32)
        return self._executor


def _tightest(tracked: dict[str, np.ndarray], result: dict, track) -> dict[str, np.ndarray]:
    """`tracked` met with the (lower, upper) pairs `track` of a graph run's `result` (tensors): each pair's
    tightest bounds so far (every run's bounds hold, so their intersection does); a pair not yet tracked starts
    from this run's."""
    tightest = dict(tracked)
    for lower_name, upper_name in track:
        found_lower, found_upper = result[lower_name].detach().numpy(), result[upper_name].detach().numpy()
        if lower_name in tracked:
            found_lower = np.maximum(tracked[lower_name], found_lower)
            found_upper = np.minimum(tracked[upper_name], found_upper)
        tightest[lower_name], tightest[upper_name] = found_lower, found_upper
    return tightest


def _finite(bounds):
    """Bounds with infinite and NaN entries (no linear bound there) set to 0, out of the steps' objective."""
    import torch
    return torch.where(torch.isfinite(bounds), bounds, torch.zeros_like(bounds))


class Adam:
    """Adam (torch.optim.Adam's defaults and update) with the learning rates times `decay` after each step.

    Written out because torch.optim's optimisers import torch._dynamo on first use: 2 s of every verify process
    (more under load) before its first alpha step."""

    BETAS, EPSILON = (0.9, 0.999), 1e-8

    def __init__(self, groups: list[tuple[list, float]], decay: float):
        import torch
        self.groups = [(params, lr) for params, lr in groups if params]
        self.decay, self.steps = decay, 0
        self.moments = [[(torch.zeros_like(p), torch.zeros_like(p)) for p in params] for params, _ in self.groups]

    def step(self, loss) -> None:
        """Minimise `loss` by one step (its gradients with respect to every parameter)."""
        import torch
        params = [p for group, _ in self.groups for p in group]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.steps += 1
        first, second = self.BETAS
        correction1, correction2 = 1 - first ** self.steps, 1 - second ** self.steps
        scale = self.decay ** (self.steps - 1)
        found = iter(grads)
        with torch.no_grad():
            for (group, lr), moments in zip(self.groups, self.moments):
                for p, (m, v) in zip(group, moments):
                    grad = next(found)
                    if grad is None:
                        continue
                    m.mul_(first).add_(grad, alpha=1 - first)
                    v.mul_(second).addcmul_(grad, grad, value=1 - second)
                    denominator = (v.sqrt() / math.sqrt(correction2)).add_(self.EPSILON)
                    p.addcdiv_(m, denominator, value=-lr * scale / correction1)


class ProofWatch:
    """A stop rule for `AlphaCrown.bounds`: stop once `score(lower)` is positive (proved) or, with `give_up`,
    once the score cannot reach zero in the remaining steps even at the largest gain of its last three steps
    (steps on a hopeless bound are wasted; the caller then branches or answers unknown). A score may be one
    number per sample: then each sample is proved or given up on by its own history, and the run stops when
    every sample is one or the other."""

    def __init__(self, score: Callable[[np.ndarray], float | np.ndarray], iterations: int, give_up: bool = True):
        self.score, self.iterations, self.give_up = score, iterations, give_up
        self.history: list[np.ndarray] = []

    def __call__(self, lower: np.ndarray, upper: np.ndarray) -> bool:
        score = np.atleast_1d(np.asarray(self.score(lower), dtype=np.float64))
        self.history.append(score)
        proved = score > 0
        if proved.all():
            return True
        if not self.give_up or len(self.history) < 4:
            return False
        gain = np.diff(np.stack(self.history[-4:]), axis=0).max(axis=0)
        hopeless = score + gain * (self.iterations + 1 - len(self.history)) < 0
        return bool((proved | hopeless).all())


class _Mixer:
    """The run-time objective with learned mixture rows appended, and the offsets of every row."""

    def __init__(self, objective: np.ndarray | None, offset: np.ndarray | None, groups: list[np.ndarray]):
        if (groups or offset is not None) and objective is None:
            raise InputError("offsets and mixtures need a run-time objective (spec='runtime')")
        self.base = None if objective is None else np.array(objective, dtype=np.float32)
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups]
        rows = 0 if objective is None else objective.shape[1]
        self.offset = np.zeros(rows, dtype=np.float32) if offset is None else np.asarray(offset, np.float32)
        self.logits = []
        if self.groups:
            import torch
            self.logits = [torch.zeros((objective.shape[0], len(g)), requires_grad=True) for g in self.groups]

    def parameters(self) -> list:
        return self.logits

    def objective_sum(self, lower):
        """What the steps maximise: every bound, except the rows of a mixture (the mixture can become any of
        them, and slopes shared by all rows are better spent on what proves the conjunct)."""
        if not self.groups:
            return lower.sum()
        mixed = np.zeros(lower.shape[1], dtype=bool)
        mixed[np.concatenate(self.groups)] = True
        return lower[:, ~mixed].sum()

    def initial_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.groups:
            return feeds
        uniform = [self.base[:, g].mean(axis=1, keepdims=True) for g in self.groups]
        return {**feeds, OBJECTIVE: np.concatenate([self.base, *uniform], axis=1).astype(np.float32)}

    def shift(self, bounds: np.ndarray) -> np.ndarray:
        """Bounds of the uniform objective rows -> with every row's offset added."""
        if self.base is None:
            return bounds
        return bounds + np.concatenate([self.offset] + [self.offset[g].mean(keepdims=True) for g in self.groups])

    def objective(self):
        """(objective [batch, m + groups, n] or None when unchanged, offsets to add [m + groups] or [batch, ...])."""
        import torch
        if not self.groups:
            return None, (0.0 if self.base is None else torch.as_tensor(self.offset))
        base, offset = torch.as_tensor(self.base), torch.as_tensor(self.offset)
        weights = [torch.softmax(logits, dim=1) for logits in self.logits]          # [batch, |g|]
        rows = [torch.einsum("bk,bkn->bn", w, base[:, g]).unsqueeze(1) for w, g in zip(weights, self.groups)]
        shifts = [(w * offset[g]).sum(dim=1, keepdim=True) for w, g in zip(weights, self.groups)]
        batch = base.shape[0]
        return torch.cat([base, *rows], dim=1), torch.cat([offset.expand(batch, -1), *shifts], dim=1)


def alpha_crown_bounds(model, kind: str = "linf", lower=None, upper=None, x=None, eps=None,
                       domain: tuple[float, float] | None = None, spec=None, spec_offset=None,
                       iterations: int = 20, lr: float = 0.1, lr_decay: float = 0.98, crown_upper: bool | None = None,
                       objective=None, stop: Stop | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the first model output, or of margins spec·y + spec_offset when spec is given.

    The input set is a box (`kind="box"`, `lower`/`upper` shaped like the model input with its batch) or an
    L-inf ball (`kind="linf"`, centre `x`, radius `eps`, clipped to `domain`); see `AlphaCrown` for the rest.
    """
    bounder = AlphaCrown(model, kind, domain, spec, spec_offset, crown_upper)
    return bounder.bounds(bounder.feeds(lower, upper, x, eps, objective), iterations, lr, lr_decay, stop)

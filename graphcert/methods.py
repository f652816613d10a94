"""One record per bound method: what it builds, which norms it bounds, whether it certifies or only trains, and
how `certify`, `verify` and training use it.

Every command, `inspect`, the CLI help and the tests read this registry, so they agree on the method list. A new
method is one `register(Method(...))` call beside its pass (see `register_builtin` for the shipped ones).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import InputError

if TYPE_CHECKING:
    import onnx_ir as ir

NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
ROLES = ("bounds", "trains")


@dataclass(frozen=True)
class Method:
    """A bound method.

    build(input_set, keep_original=True, trainable=False, norm=..., objective=...) returns the onnx_ir pass of a
    single-graph method (None for methods that combine other methods' graphs at run time, like `auto`).
    supports(node) says whether its rules take a node (None: it takes whatever its stages take).
    """
    name: str
    summary: str
    norms: tuple[str, ...] = ("linf",)
    role: str = "bounds"
    # "graph": one bound graph (build); "refine": optimises its last stage's bounds on what the earlier stages
    # leave open (alpha-CROWN); "ladder": runs its stages cheapest first on what stays undecided (auto)
    combines: str = "graph"
    build: Callable[..., "ir.passes.PassBase"] | None = None
    supports: Callable[["ir.Node"], bool] | None = None
    own_objective: bool = False              # folds a run-time objective itself (spec="runtime")
    trainable: bool = False                  # `graphcert train` can train through its graph
    refusal: str | None = None               # role "trains": why it does not certify, and what does
    certified_by: str | None = None          # role "trains": the method that certifies a model it trained
    linear_relaxation: bool = False          # holds per-sample coefficient matrices: certify sizes its batches
    certify_stages: dict[str, tuple[str, ...]] = field(default_factory=dict)  # norm -> cheapest-first ladder
    verify_stages: tuple[str, ...] = ()      # verify's ladder, cheapest first
    verify_root_stages: int = 0              # ladder stages verify skips below the root box
    branches_on_relus: bool = False          # verify may split unstable ReLUs with this method

    def __post_init__(self):
        if self.combines not in ("graph", "refine", "ladder"):
            raise ValueError(f"method {self.name}: combines must be graph, refine or ladder")
        if (self.combines == "graph") != (self.build is not None):
            raise ValueError(f"method {self.name}: exactly the single-graph methods have a build function")
        if self.role not in ROLES:
            raise ValueError(f"method {self.name}: role must be one of {ROLES}")
        if self.role == "trains" and not (self.refusal and self.certified_by):
            raise ValueError(f"method {self.name}: a training-only method says why and what certifies instead")

    @property
    def certifies(self) -> bool:
        return self.role == "bounds"

    def bounds_norm(self, norm: str) -> bool:
        return norm in self.norms

    def certified_with(self) -> str:
        """The method that certifies a model trained through this one."""
        return self.certified_by or self.name

    def stages_of(self, norm: str) -> tuple[str, ...]:
        """The single-graph methods this method runs for certify, in order (itself when it is one)."""
        return self.certify_stages.get(norm, (self.name,))


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def all_methods() -> dict[str, Method]:
    if not REGISTRY:
        register_builtin()
    return REGISTRY


def names(role: str | None = None, norm: str | None = None, graph: bool | None = None,
          trainable: bool | None = None) -> list[str]:
    """Registered method names, sorted; filtered by role, by a norm they bound, by whether they are one bound
    graph (graph=True) or combine several at run time (graph=False), and by whether `train` takes them."""
    return sorted(m.name for m in all_methods().values()
                  if (role is None or m.role == role) and (norm is None or norm in m.norms)
                  and (graph is None or (m.combines == "graph") == graph)
                  and (trainable is None or m.trainable == trainable))


def get(name: str) -> Method:
    """The method called `name`, or an InputError listing the methods there are."""
    if name not in all_methods():
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(names())}")
    return REGISTRY[name]


def check_norm_name(norm: str) -> None:
    if norm not in NORM_NAMES:
        raise InputError(f"unknown norm '{norm}'; choose linf or l2")


def check_norm(name: str, norm: str) -> None:
    """An InputError unless method `name` bounds balls of `norm`, naming the methods that do."""
    check_norm_name(norm)
    method = get(name)
    if norm in method.norms:
        return
    if method.role == "trains":
        raise InputError(method.refusal)
    balls = " and ".join(NORM_NAMES[n] for n in method.norms)
    raise InputError(f"method '{name}' bounds {balls} balls only; for {NORM_NAMES[norm]} use "
                     f"{', '.join(names(role='bounds', norm=norm))}")


def check_certifies(name: str, norm: str) -> Method:
    """The method, when it can certify balls of `norm`; otherwise the one-line reason."""
    method = get(name)
    if method.role == "trains":
        raise InputError(method.refusal)
    check_norm(name, norm)
    return method


def help_text(role: str | None = "bounds", graph: bool | None = None, norm: str | None = None,
              trainable: bool | None = None) -> str:
    """"a, b or c" for CLI help strings."""
    listed = names(role=role, graph=graph, norm=norm, trainable=trainable)
    return ", ".join(listed[:-1]) + (" or " if len(listed) > 1 else "") + listed[-1]


def _pass_module(name: str):
    return importlib.import_module(f"graphcert.passes.{name}")


def register_builtin() -> None:
    """The shipped methods. Their passes are imported when a graph is built or a node checked, not here, so
    reading names and norms (the CLI's help) stays cheap."""
    register(Method(
        "ibp", "interval bound propagation", norms=("linf",), trainable=True,
        build=lambda input_set, keep_original=True, trainable=False, **_: _pass_module("ibp").IntervalPass(
            input_set, keep_original=keep_original, trainable=trainable),
        supports=lambda node: node.op_type in _pass_module("ibp").RULES and _pass_module("ibp").accepts(node)))
    for name, intermediate, summary in (
            ("crown", "crown", "backward linear bounds (CROWN), intermediate bounds by CROWN itself"),
            ("crown-ibp", "ibp", "backward linear bounds (CROWN) on IBP intermediate bounds")):
        register(Method(
            name, summary, norms=("linf", "l2"), linear_relaxation=True, trainable=True,
            build=lambda input_set, keep_original=True, trainable=False, norm="linf", intermediate=intermediate,
            **_: _pass_module("crown").CrownPass(input_set, keep_original=keep_original, trainable=trainable,
                                                 intermediate=intermediate, norm=norm),
            supports=_crown_supports, branches_on_relus=name == "crown"))
    register(Method(
        "alpha-crown", "CROWN with lower slopes optimised by gradient (PyTorch executor)", norms=("linf", "l2"),
        supports=_crown_supports, linear_relaxation=True, branches_on_relus=True, combines="refine",
        certify_stages={"linf": ("crown", "alpha-crown"), "l2": ("crown", "alpha-crown")},
        verify_stages=("crown", "alpha-crown"), verify_root_stages=0))
    register(Method(
        "auto", "cheapest method first, stronger ones on what stays undecided", norms=("linf", "l2"),
        branches_on_relus=True, combines="ladder",
        certify_stages={"linf": ("ibp", "crown-ibp", "crown", "alpha-crown"),
                        "l2": ("lipschitz", "crown-ibp", "crown", "alpha-crown")},
        verify_stages=("ibp", "crown", "alpha-crown"), verify_root_stages=1))
    register(Method(
        "lipschitz", "Lipschitz-margin certificate from a sound L2 Lipschitz constant", norms=("l2",),
        build=_lipschitz_pass, supports=lambda node: _pass_module("lipschitz").supports(node), own_objective=True))
    register(Method(
        "gloro", "GloRo training graphs (power-iteration Lipschitz estimates)", norms=("l2",), role="trains", trainable=True,
        build=_gloro_pass, supports=lambda node: _pass_module("gloro").supports(node), own_objective=True,
        certified_by="lipschitz",
        refusal="gloro estimates Lipschitz constants by power iteration, from below: it is for training "
                "(graphcert train --method gloro); certify with --method lipschitz --norm l2"))
    register(Method(
        "orthogonal", "1-Lipschitz training graphs (Björck-orthonormal weights)", norms=("l2",), role="trains", trainable=True,
        build=_orthogonal_pass, supports=lambda node: _pass_module("orthogonal").supports(node),
        own_objective=True, certified_by="lipschitz",
        refusal="orthogonal builds training graphs whose margin bound trusts the Björck iteration: it is for "
                "training (graphcert train --method orthogonal); certify with --method lipschitz --norm l2"))


def _crown_supports(node) -> bool:
    return _pass_module("crown").supports(node)


def _lipschitz_pass(input_set, keep_original=True, trainable=False, norm="l2", objective=False, **_):
    if trainable:
        raise InputError("lipschitz folds the network's Lipschitz constant into the graph as a number; "
                         "it cannot be trained through: use ibp, crown-ibp or crown")
    return _pass_module("lipschitz").LipschitzPass(input_set, keep_original=keep_original, objective=objective)


def _gloro_pass(input_set, keep_original=True, trainable=False, norm="l2", objective=False, **_):
    if not (trainable and objective):
        raise InputError(REGISTRY["gloro"].refusal)
    return _pass_module("gloro").GloroPass(input_set, keep_original=keep_original)


def _orthogonal_pass(input_set, keep_original=True, trainable=False, norm="l2", objective=False, **_):
    if not (trainable and objective):
        raise InputError(REGISTRY["orthogonal"].refusal)
    return _pass_module("orthogonal").OrthogonalPass(input_set, keep_original=keep_original)

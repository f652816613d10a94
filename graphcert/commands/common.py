"""What the `graphcert` subcommands share: the default model, shipped model names, the parallel and
alpha-CROWN options. Only the standard library and the method registry are imported here (parsing stays fast)."""
from __future__ import annotations

import os

from graphcert import methods  # noqa: F401  (the method registry: names and norms only, no passes imported)

DEFAULT_MODEL = "mnist_mlp"
# graphcert.distributed's defaults, repeated so that parsing arguments does not import it (kept equal by a test).
DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB = 2, 4096


def shipped_model(name: str) -> str:
    """A model path, or the name of a model shipped in models/ (with or without .onnx)."""
    if os.path.exists(name):
        return name
    from graphcert.models import shipped_path
    return shipped_path(name) or name


def add_parallel_options(p) -> None:
    g = p.add_argument_group("parallel runs (one task per instance or shard of samples)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run N tasks at a time in worker processes of this machine (one thread each); with --ray: "
                        "tasks in flight, and the CPUs of a local cluster")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the tasks on Ray: 'auto' or ADDRESS joins a running cluster; with no ADDRESS a local "
                        "cluster is started for the run (needs pip install 'graphcert[ray]')")
    g.add_argument("--resume", action="store_true",
                   help="keep the results already in the results file and run only the missing tasks")
    g.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"times a task whose worker died is run again before it is an error (default: {DEFAULT_RETRIES})")
    g.add_argument("--task-memory", type=float, default=DEFAULT_TASK_MEMORY_MB, metavar="MB",
                   help=f"memory cap of one task in a worker, in MB (default: {DEFAULT_TASK_MEMORY_MB})")


def parallel_executor(args):
    from graphcert.distributed import make_executor
    return make_executor(args.workers, args.ray, args.retries, args.task_memory)


def parallel_requested(args) -> bool:
    return args.workers is not None or args.ray is not None or args.resume


def add_alpha_options(p, defaults) -> None:
    p.add_argument("--alpha-iterations", type=int, default=defaults.iterations,
                   help=f"alpha-CROWN Adam steps (default: {defaults.iterations})")
    p.add_argument("--alpha-lr", type=float, default=defaults.lr,
                   help=f"alpha-CROWN learning rate (default: {defaults.lr:g})")


def alpha_settings(args, defaults):
    import dataclasses
    return dataclasses.replace(defaults, iterations=args.alpha_iterations, lr=args.alpha_lr)


def clipping_note(data, clip: bool, method: str) -> str:
    """Say whether the ball was clipped to the data domain: a data file without `domain` is never clipped."""
    if data.domain is None:
        return "input set: the whole ball (the data declare no domain, so nothing is clipped)"
    lo, hi = data.domain
    if not clip:
        return f"input set: the whole ball (--no-clip; the data domain is [{lo:g}, {hi:g}])"
    if method == "lipschitz":
        return f"input set: the whole ball (lipschitz never clips; a superset of the ball within [{lo:g}, {hi:g}])"
    return f"input set: the ball clipped to the data domain [{lo:g}, {hi:g}]"



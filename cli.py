"""The `graphcert` command: parses arguments, calls the library, formats the results."""
from __future__ import annotations

import argparse
import json
import os
import sys

from graphcert import methods  # noqa: E402  (the method registry: names and norms only, no passes imported)
from graphcert.commands.certify import add_certify, add_report  # noqa: E402
from graphcert.commands.common import (DEFAULT_MODEL, DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB,  # noqa: E402,F401
                                       shipped_model)
from graphcert.commands.train import add_export_training, add_train  # noqa: E402
from graphcert.commands.verify import VERDICT_EXIT_CODES, add_verify  # noqa: E402,F401


# ---- convert -------------------------------------------------------------------------------------------

def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write the bound graph of a model")
    p.add_argument("model", help="ONNX model file (or the name of a shipped model)")
    p.add_argument("-o", "--output", required=True, help="where to write the bound graph (.onnx)")
    p.add_argument("--method", default="ibp", help=f"{methods.help_text(graph=True)} (default: ibp)")
    p.add_argument("--domain", nargs=2, type=float, metavar=("LO", "HI"),
                   help="clip the input box to [LO, HI] (e.g. 0 1 for pixels)")
    p.add_argument("--spec", help="VNN-LIB property whose output constraints are folded in as margins")
    p.add_argument("--perturb", metavar="NAME[,NAME]",
                   help="the inputs to perturb, each with its own radius NAME_epsilon when several (default: the "
                        "first floating-point input); the other inputs are fed as given")
    p.add_argument("--norm", default="linf",
                   help="epsilon is an L-inf (default) or L2 (l2: methods crown-ibp, crown, lipschitz) radius")
    p.add_argument("--certificate", action="store_true",
                   help="write a certified-prediction graph instead: input -> logits, prediction, certified_radius "
                        "(closed form for lipschitz, else the largest certified rung of --ladder)")
    p.add_argument("--ladder", help="with --certificate: the radii tried, e.g. 0.001,0.002,0.005 or start:stop:step "
                                    "(default: 0.001,0.002,0.005,...,0.2 for linf; ten times that for l2)")
    p.add_argument("--rounding", choices=("float32", "real"), default=None,
                   help="with --certificate: radii hold for the model as it runs in float32 (default), or in real "
                        "arithmetic only")
    p.set_defaults(run=run_convert, reads=("model", "spec"), writes=("output",))


def run_convert(args) -> int:
    from graphcert import api
    from graphcert.errors import InputError
    if args.ladder and not args.certificate:
        raise InputError("--ladder goes with --certificate")
    if args.rounding and not args.certificate:
        raise InputError("--rounding goes with --certificate")
    if args.certificate:
        if args.spec:
            raise InputError("--certificate certifies the prediction; it takes no --spec")
        from graphcert.sweep import parse_eps
        ladder = parse_eps(args.ladder) if args.ladder else None
        if ladder and args.method == "lipschitz":
            raise InputError("lipschitz certificates are in closed form; drop --ladder")
        proto = api.convert_certificate(shipped_model(args.model), args.output, method=args.method,
                                        domain=tuple(args.domain) if args.domain else None, norm=args.norm,
                                        ladder=ladder, rounding=args.rounding or "float32")
        meta = {p.key: p.value for p in proto.metadata_props}
        print(f"wrote {args.output} (certificate, {args.method}, {args.norm}, radii: "
              f"{meta.get('graphcert.certificate.rungs')}): input {proto.graph.input[0].name}; outputs "
              + ", ".join(o.name for o in proto.graph.output))
        from graphcert.certify import samples_per_run
        per_run = samples_per_run(api.load(shipped_model(args.model)), args.method)
        if per_run is not None:
            rungs = len(meta.get("graphcert.certificate.rungs", "").split(","))
            print(f"note: {args.method} holds coefficient matrices for every input and rung; serve this graph in "
                  f"batches of about {max(1, per_run // rungs)} inputs or fewer per 2 GB of memory")
        return 0
    proto = api.convert(shipped_model(args.model), args.output, method=args.method,
                        domain=tuple(args.domain) if args.domain else None, spec_path=args.spec, norm=args.norm,
                        perturb=args.perturb.split(",") if args.perturb else None)
    inputs = ", ".join(i.name for i in proto.graph.input)
    outputs = ", ".join(o.name for o in proto.graph.output)
    print(f"wrote {args.output} ({args.method}): inputs {inputs}; outputs {outputs}")
    return 0


# ---- inspect -------------------------------------------------------------------------------------------

def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="inputs, outputs, op counts and method support of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    from graphcert.inspect import describe
    info = describe(shipped_model(args.model))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model: {info['path']} (opset {info['opset']}, producer {info['producer'] or '?'})")
    for kind in ("inputs", "outputs"):
        for item in info[kind]:
            print(f"  {kind[:-1]:6} {item['name']}: {item['shape']}")
    print("ops: " + ", ".join(f"{op} x{n}" for op, n in info["ops"].items()))
    print(f"batch: {info['batch']}")
    from graphcert import methods
    for method, missing in info["methods"].items():
        record = methods.get(method)
        role = "train only" if record.role == "trains" else "bounds " + "/".join(record.norms)
        state = "supported" if not missing else "unsupported: " + info["reasons"].get(method, ", ".join(missing))
        if not missing and info["fallback"].get(method):
            state += f" ({len(info['fallback'][method])} node(s) via IBP fallback: see --json)"
        print(f"  {method:12} {role:17} {state}")
    return 0


# ---- entry point ---------------------------------------------------------------------------------------

def _version() -> str:
    try:  # the installed distribution's version, without importing the library (it loads onnx)
        from importlib.metadata import version
        return version("graphcert")
    except Exception:  # a checkout run without installing
        return "0.1.0 (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphcert", description="Certified robustness for ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphcert {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert, add_inspect, add_certify, add_report, add_verify, add_train, add_export_training):
        add(sub)
    return parser


def read_paths(args) -> list[str]:
    """The files a command reads: its `reads` arguments, shipped model names resolved, and for --instances
    every model and property the instances file lists."""
    paths = []
    for name in getattr(args, "reads", ()):
        value = getattr(args, name, None)
        if value is None:
            continue
        paths.append(shipped_model(value) if name == "model" else value)
        if name == "instances" and os.path.isfile(value):
            import csv
            folder = os.path.dirname(os.path.abspath(value))
            with open(value, newline="") as handle:
                paths += [os.path.join(folder, cell) for row in csv.reader(handle)
                          if row and not row[0].startswith("#") for cell in row[:2]]
    return paths


def written_paths(args) -> list[str]:
    """The files a command writes: its `writes` arguments; train's checkpoint sits beside its output."""
    paths = []
    for name in getattr(args, "writes", ()):
        if name == "checkpoint":
            paths.append(f"{args.output}.ckpt" if getattr(args, "output", None) else None)
        else:
            paths.append(getattr(args, name, None))
    return [p for p in paths if p is not None]


def process_started() -> float | None:
    """When this process started, on the time.monotonic() clock (Linux /proc), or None."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        import time
        return time.monotonic() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: workers stopped, the results file left resumable


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command itself (not a caller in this process): its clock starts with the process
        args.process_started = process_started()
    import signal
    import threading
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        return _run(args)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    from graphcert.errors import GraphcertError
    from graphcert.files import refuse_overwrite
    try:
        refuse_overwrite(written_paths(args), read_paths(args))
        return args.run(args)
    except GraphcertError as exc:
        print(f"graphcert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphcert: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:
        print(f"graphcert: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

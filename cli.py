"""The `graphcert` command: parses arguments, calls the library, formats the results."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_MODEL = "mnist_mlp"
# graphcert.distributed's defaults, repeated so that parsing arguments does not import it (kept equal by a test).
DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB = 2, 4096

from graphcert import methods  # noqa: E402  (the method registry: names and norms only, no passes imported)


def shipped_model(name: str) -> str:
    """A model path, or the name of a model shipped in models/ (with or without .onnx)."""
    if os.path.exists(name):
        return name
    from graphcert.models import shipped_path
    return shipped_path(name) or name


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
    p.set_defaults(run=run_convert, reads=("model", "spec"), writes=("output",))


def run_convert(args) -> int:
    from graphcert import api
    from graphcert.errors import InputError
    if args.ladder and not args.certificate:
        raise InputError("--ladder goes with --certificate")
    if args.certificate:
        if args.spec:
            raise InputError("--certificate certifies the prediction; it takes no --spec")
        from graphcert.sweep import parse_eps
        ladder = parse_eps(args.ladder) if args.ladder else None
        if ladder and args.method == "lipschitz":
            raise InputError("lipschitz certificates are in closed form; drop --ladder")
        proto = api.convert_certificate(shipped_model(args.model), args.output, method=args.method,
                                        domain=tuple(args.domain) if args.domain else None, norm=args.norm,
                                        ladder=ladder)
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
        print(f"  {method:12} {role:17} {state}")
    return 0


# ---- certify -------------------------------------------------------------------------------------------

def add_certify(sub) -> None:
    p = sub.add_parser("certify", help="clean and certified accuracy on a data set at an L-inf or L2 radius")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"ONNX model file or shipped model name (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default="mnist-test", help="mnist-test, mnist5k, digits or FILE.npz (x, y)")
    p.add_argument("--eps", default="0.01",
                   help="radius in --norm, a list (0.005,0.01,0.02) or start:stop:step (stop included) (default: 0.01)")
    p.add_argument("--norm", default="linf",
                   help="the perturbation ball: linf (default) or l2 (methods lipschitz, crown-ibp, crown, "
                        "alpha-crown, auto; lipschitz never clips the ball to the data domain)")
    p.add_argument("--method", default="ibp",
                   help=f"{methods.help_text()}: lipschitz is L2 only (a Lipschitz-margin certificate); auto runs "
                        "the cheapest first, escalating on undecided samples only; or a list (ibp,crown) (default: ibp)")
    p.add_argument("--radius", action="store_true",
                   help="find each sample's largest certified radius per method (bisection; closed form for "
                        "lipschitz) and report its distribution")
    p.add_argument("--radius-tol", type=float, default=1e-4, help="bisection tolerance of --radius (default: 1e-4)")
    p.add_argument("--per-sample", metavar="FILE.csv",
                   help="write index, label, prediction, certified at each radius and the radius per sample")
    p.add_argument("--plot", metavar="FILE", help="draw certified accuracy against the radius (.png or .svg)")
    p.add_argument("--limit", type=int, help="certify only the first N samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-clip", action="store_true", help="do not clip the input box to the data domain")
    p.add_argument("--rounding", default="float32", choices=("float32", "real"),
                   help="float32 (default): certificates hold for the model as it runs in float32 (margins must "
                        "beat a rounding-error bound); real: in real arithmetic only")
    from graphcert.alpha_settings import CERTIFY_ALPHA
    add_alpha_options(p, CERTIFY_ALPHA)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_parallel_options(p)
    p.add_argument("--results", metavar="FILE.jsonl",
                   help="stream one JSON line per shard of samples into FILE as shards finish (for --resume)")
    p.add_argument("--shard-size", type=int,
                   help="samples per task with --workers/--ray, rounded up to whole batches (default: 4 batches)")
    p.set_defaults(run=run_certify, reads=("model", "data"), writes=("per_sample", "plot", "results"))


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


def run_certify(args) -> int:
    from graphcert.alpha_settings import CERTIFY_ALPHA
    from graphcert.data import load_dataset
    from graphcert.errors import InputError
    from graphcert.sweep import parse_eps, parse_methods
    eps, methods = parse_eps(args.eps), parse_methods(args.method)
    if args.plot:
        from graphcert.plots import figure_format
        figure_format(args.plot)
    data = load_dataset(args.data)
    if len(eps) == 1 and len(methods) == 1 and not (args.radius or args.per_sample or args.plot):
        return _certify_one(args, data, eps[0], methods[0], alpha_settings(args, CERTIFY_ALPHA))
    if parallel_requested(args) or args.results:
        raise InputError("--workers, --ray, --results and --resume run one --eps and one --method without "
                         "--radius, --per-sample or --plot; a sweep runs in this process")
    from graphcert.sweep import sweep
    result = sweep(shipped_model(args.model), data, eps, methods, limit=args.limit, batch_size=args.batch_size,
                   clip=not args.no_clip, progress=not args.json and sys.stderr.isatty(),
                   alpha=alpha_settings(args, CERTIFY_ALPHA), norm=args.norm, radius=args.radius,
                   tolerance=args.radius_tol, model_name=args.model, rounding=args.rounding)
    if args.per_sample:
        result.write_per_sample(args.per_sample)
    if args.plot:
        from graphcert.plots import plot_curves
        plot_curves(result, args.plot)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"{result.n} samples of {data.name}, {result.norm}; clean accuracy {result.clean / result.n:.2%} "
          f"({result.clean}/{result.n})")
    for note in dict.fromkeys(clipping_note(data, not args.no_clip, m) for m in methods):
        print(note)
    print(f"{'method':12} {'eps':>8} {'certified':>20} {'seconds':>9}")
    for row in result.rows():
        share = f"{row.certified_accuracy:.2%} ({row.certified}/{row.n})"
        print(f"{row.method:12} {row.eps:8.4g} {share:>20} {row.seconds:9.2f}")
    if result.radii:
        print(f"certified radius per sample (0: not certified; bisection to {args.radius_tol:g}, "
              f"closed form for lipschitz):")
        print(f"{'method':12} {'median':>9} {'q10':>9} {'q25':>9} {'q75':>9} {'q90':>9} {'max':>9} {'seconds':>9}")
        for method, stats in result.radius_stats().items():
            q = stats["quantiles"]
            print(f"{method:12} {stats['median']:9.4g} {q['0.1']:9.4g} {q['0.25']:9.4g} {q['0.75']:9.4g} "
                  f"{q['0.9']:9.4g} {stats['max']:9.4g} {stats['seconds']:9.2f}")
    for path, what in ((args.per_sample, "per-sample results"), (args.plot, "plot")):
        if path:
            print(f"wrote {what} to {path}")
    return 0


def _certify_one(args, data, eps: float, method: str, alpha) -> int:
    from graphcert.certify import certify
    from graphcert.errors import InputError
    if (parallel_requested(args) or args.results) and args.rounding != "float32":
        raise InputError("--workers, --ray and --results certify for the float32 model; drop --rounding real")
    if parallel_requested(args) or args.results:
        from graphcert.distributed.shards import certify_sharded
        result, summary = certify_sharded(
            shipped_model(args.model), args.data, eps, method=method, limit=args.limit, batch_size=args.batch_size,
            clip=not args.no_clip, alpha=alpha, norm=args.norm, executor=parallel_executor(args),
            results_path=args.results, resume=args.resume, progress=not args.json and sys.stderr.isatty(),
            shard_size=args.shard_size)
        print(summary.line(), file=sys.stderr)
    else:
        result = certify(shipped_model(args.model), data, eps, method=method, limit=args.limit,
                         batch_size=args.batch_size, clip=not args.no_clip,
                         progress=not args.json and sys.stderr.isatty(), alpha=alpha, norm=args.norm,
                         rounding=args.rounding)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{result.n} samples of {data.name}, {result.norm} eps={result.eps:g}, method={result.method}")
        print(clipping_note(data, not args.no_clip, method))
        print(f"clean accuracy:     {result.clean_accuracy:.2%} ({result.clean}/{result.n})")
        print(f"certified accuracy: {result.certified_accuracy:.2%} ({result.certified}/{result.n})")
        print(f"seconds:            {result.seconds:.2f}")
        for name, stage in (result.stages or {}).items():
            detail = {"ran": lambda: f"ran on {stage['samples']} samples, certified {stage['certified']} more",
                      "skipped": lambda: f"skipped: {stage.get('reason')}",
                      "not needed": lambda: "not needed (every sample decided before it)"}[stage["status"]]()
            print(f"  {name:12} {detail}")
    return 0


# ---- report --------------------------------------------------------------------------------------------

def add_report(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report: model, certified accuracy curves, radii, "
                                      "per-class accuracy, least robust samples")
    p.add_argument("model", help="ONNX model file or shipped model name")
    p.add_argument("--data", default="mnist-test", help="mnist-test, mnist5k, digits or FILE.npz (x, y)")
    p.add_argument("-o", "--output", required=True, help="where to write the report (.html)")
    p.add_argument("--norm", default="linf", help="linf (default) or l2")
    p.add_argument("--eps", help="radii: a list or start:stop:step (default: 0:0.05:0.005 for linf, 0:1:0.1 for l2)")
    p.add_argument("--method", help="a list of methods (default: those of ibp, crown-ibp, crown (linf) or "
                                    "lipschitz, crown-ibp, crown (l2) that support the model)")
    p.add_argument("--limit", type=int, default=200, help="the first N samples (default: 200)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-clip", action="store_true", help="do not clip the input box to the data domain")
    p.add_argument("--radius-tol", type=float, default=1e-4, help="bisection tolerance of the radii (default: 1e-4)")
    p.set_defaults(run=run_report, reads=("model", "data"), writes=("output",))


def run_report(args) -> int:
    from graphcert.data import load_dataset
    from graphcert.errors import InputError
    from graphcert.report import DEFAULT_EPS, build_report, default_methods, write_report
    from graphcert.sweep import parse_eps, parse_methods
    if args.norm not in DEFAULT_EPS:
        raise InputError(f"unknown norm '{args.norm}'; choose linf or l2")
    if not args.output.lower().endswith((".html", ".htm")):
        raise InputError(f"report {args.output}: give a file ending in .html")
    model = shipped_model(args.model)
    eps = parse_eps(args.eps or DEFAULT_EPS[args.norm])
    methods = parse_methods(args.method) if args.method else default_methods(model, args.norm)
    page, result = build_report(model, load_dataset(args.data), eps, methods, args.limit, norm=args.norm,
                                clip=not args.no_clip, batch_size=args.batch_size, tolerance=args.radius_tol,
                                progress=sys.stderr.isatty(), model_name=args.model)
    write_report(page, args.output)
    print(f"wrote {args.output}: {result.n} samples, methods {', '.join(methods)}, {len(eps)} radii "
          f"({len(page) // 1024} KB)")
    return 0


# ---- verify --------------------------------------------------------------------------------------------

# A script can branch on the verdict without parsing output; 2 stays "bad input" and 130 "interrupted".
VERDICT_EXIT_CODES = {"holds": 0, "violated": 10, "unknown": 20, "timeout": 30}


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="decide a VNN-LIB property (holds / violated / unknown)",
                       description="graphcert verify MODEL SPEC, or graphcert verify --instances FILE.csv. "
                                   "Exit code: 0 holds, 10 violated, 20 unknown, 30 timeout, 2 bad input "
                                   "(with --instances: 0 once every instance has a result).")
    p.add_argument("model", nargs="?", help="ONNX model file (or the name of a shipped model)")
    p.add_argument("spec", nargs="?", help="VNN-LIB property file")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for one property, process start and model loading included (default: 60)")
    p.add_argument("--memory", help="memory budget such as 4GB or 512MB; every stage sizes its batches to it "
                                    "(default: half of the memory available at start)")
    p.add_argument("--out", help="result file (competition format), or the results CSV with --instances")
    p.add_argument("--method", default="crown", help=f"{methods.help_text(norm='linf')} (default: crown)")
    p.add_argument("--instances", help="competition instances CSV (onnx, vnnlib, timeout; paths relative to it)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="with --instances: scale every timeout")
    p.add_argument("--rounding", default="float32", choices=("float32", "real"),
                   help="float32 (default): holds means for the model as it runs in float32; real: in real "
                        "arithmetic, as the competition reads properties")
    p.add_argument("--plot", metavar="FILE", help="with --instances: draw the cactus plot (.png or .svg)")
    p.add_argument("--reference", metavar="CSV",
                   help="with --plot: another tool's results (onnx, vnnlib, abcrown_answer or status, wall_s or "
                        "seconds) drawn beside ours on the same instances")
    from graphcert.alpha_settings import VERIFY_ALPHA
    add_alpha_options(p, VERIFY_ALPHA)
    add_parallel_options(p)
    p.set_defaults(run=run_verify, reads=("model", "spec", "instances", "reference"), writes=("out", "plot"))


def run_verify(args) -> int:
    import math
    import time

    from graphcert.alpha_settings import VERIFY_ALPHA
    from graphcert.errors import InputError
    started = getattr(args, "process_started", None) or time.monotonic()
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if not (math.isfinite(args.timeout_scale) and args.timeout_scale > 0):
        raise InputError(f"--timeout-scale must be a positive number, got {args.timeout_scale:g}")
    from graphcert.verify.resources import parse_memory
    memory = parse_memory(args.memory) if args.memory is not None else None
    if (args.plot or args.reference) and not args.instances:
        raise InputError("--plot and --reference draw a cactus plot of --instances runs")
    if args.reference and not args.plot:
        raise InputError("--reference needs --plot FILE")
    if args.instances:
        if args.model or args.spec:
            raise InputError("give either MODEL SPEC or --instances FILE.csv, not both")
        if args.plot:
            from graphcert.plots import figure_format, read_reference
            figure_format(args.plot)
            if args.reference:
                read_reference(args.reference)   # a malformed reference fails before hours of verification
        from graphcert import verify as verifier
        from graphcert.distributed.instances import run_instances
        results, run = run_instances(args.instances, args.out, method=args.method, progress=sys.stderr.isatty(),
                                     timeout_scale=args.timeout_scale, alpha=alpha_settings(args, VERIFY_ALPHA),
                                     executor=parallel_executor(args), resume=args.resume, memory=memory,
                                     rounding=args.rounding)
        for r in results:
            print(f"{r.onnx},{r.vnnlib},{r.status},{r.seconds:.2f}")
        summary = verifier.summarize(results)
        print(f"{len(results)} instances: " + ", ".join(f"{k} {summary[k]}" for k in (*verifier.STATUSES, "error"))
              + f"; median {summary['median_seconds']:.2f} s")
        print(run.line(), file=sys.stderr)
        if args.plot:
            from graphcert.plots import plot_cactus
            plot_cactus(results, args.plot, args.reference)
            print(f"wrote cactus plot to {args.plot}")
        return 0
    if not (args.model and args.spec):
        raise InputError("verify needs MODEL and SPEC (or --instances FILE.csv)")
    if parallel_requested(args):
        raise InputError("--workers, --ray and --resume run the instances of --instances FILE.csv; "
                         "a single property runs in this process")
    from graphcert.verify.resources import Budget
    budget = Budget(memory)
    alpha = alpha_settings(args, VERIFY_ALPHA)

    def answer(status: str, reason: str, result=None) -> None:
        """Print (and write) the verdict; the guard calls it when a stage overruns the deadline or budget."""
        from graphcert.verify.competition import write_result
        from graphcert.verify import Result
        result = result or Result(status, None, time.monotonic() - started, reason=reason)
        if args.out:
            write_result(result, args.out)
        print(result.status, flush=True)
        print(f"{result.seconds:.2f} s, {result.boxes} boxes bounded" + (f"; {result.reason}" if result.reason
                                                                          else ""), file=sys.stderr, flush=True)

    process = getattr(args, "process_started", None) is not None
    if process:
        # The command itself: a small parent keeps the deadline and the budget while a child does the work
        # (a thread could not: the heavy imports and kernels hold the GIL for seconds).
        from graphcert.verify.isolate import supervise
        sys.stdout.flush()
        sys.stderr.flush()
        code = supervise(started + args.timeout, budget, answer, VERDICT_EXIT_CODES.__getitem__)
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    from graphcert import verify as verifier
    result = verifier.verify(shipped_model(args.model), args.spec, timeout=args.timeout, method=args.method,
                             alpha=alpha, memory=budget.total, started=started, rounding=args.rounding)
    answer(result.status, result.reason, result)
    if process:
        # End now rather than spend the promised second tearing down large sessions.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(VERDICT_EXIT_CODES[result.status])
    return VERDICT_EXIT_CODES[result.status]


# ---- train ---------------------------------------------------------------------------------------------

def add_train(sub) -> None:
    p = sub.add_parser("train", help="certified training (IBP, CROWN-IBP, GloRo, 1-Lipschitz orthogonal) of an ONNX "
                                     "model or a standard architecture")
    p.add_argument("model", nargs="?", help="ONNX model to fine-tune (or a shipped model name); or use --arch")
    p.add_argument("--arch", help="build a standard architecture instead: mlp (784-100-100-100-10), cnn, or lipmlp "
                                  "(784-256-256-256-10 with GroupSort2, for --method orthogonal)")
    p.add_argument("-o", "--output", help="where to write the trained model (.onnx); the checkpoint goes to OUTPUT.ckpt")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist-test or FILE.npz (x, y) (default: mnist5k)")
    p.add_argument("--eps", type=float, help="target radius: L-inf, or L2 for --method gloro and orthogonal")
    p.add_argument("--method", default="ibp",
                   help=f"bound method to train through: {methods.help_text(role=None, trainable=True)} (gloro "
                        "and orthogonal train for L2: orthogonal keeps Björck-orthonormal weights, a 1-Lipschitz "
                        "network; certify those with --method lipschitz --norm l2) (default: ibp)")
    p.add_argument("--loss", default="ce",
                   help="ce (cross-entropy on certified margins, annealed by --kappa), or with --method orthogonal: "
                        "tau-ce (cross-entropy of tau-scaled logits, over tau) or hkr (hinge minus "
                        "Kantorovich-Rubinstein) (default: ce)")
    # Their defaults live in graphcert.training.losses.Loss (not imported here: it would slow every command).
    p.add_argument("--tau", type=float, help="tau-ce temperature: small is robust, large is accurate (default: 3)")
    p.add_argument("--hkr-alpha", type=float, help="hkr weight of the hinge against KR (default: 50)")
    p.add_argument("--hkr-margin", type=float,
                   help="hkr hinge margin between the label's logit and the others (default: 1)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup", type=int, help="epochs at eps = 0 first (default: a fifth of --epochs)")
    p.add_argument("--rampup", type=int, help="epochs in which eps grows to its target (default: the rest); "
                                              "warm-up + ramp-up may not exceed --epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--kappa", type=float, default=0.0,
                   help="final weight of the clean loss; it anneals from 1 during ramp-up (default: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="linear", help="eps ramp: linear or smooth (Shi et al. 2021) (default: linear)")
    p.add_argument("--init", default="default", help="default (keep the weights) or ibp (Shi et al. 2021)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="clip the gradient's L2 norm (0: off; default: 10)")
    p.add_argument("--backend", default="torch", help="torch or ort-training (default: torch)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the data held out to report certified accuracy (default: 0.1)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (default: 1)")
    p.add_argument("--hr-alpha", type=float, default=0.0,
                   help="holistic robust training: fraction of the data that may be poisoned (default: 0)")
    p.add_argument("--hr-r", type=float, default=0.0,
                   help="holistic robust training: KL radius for statistical error (default: 0; with --hr-alpha 0: "
                        "plain certified training)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(run=run_train, reads=("model", "data"), writes=("output", "checkpoint"))


def run_train(args) -> int:
    from dataclasses import asdict
    from graphcert.errors import InputError
    from graphcert.training import TrainConfig, train
    if args.output is None:
        raise InputError("missing -o OUTPUT.onnx: where to write the trained model")
    if args.eps is None:
        raise InputError("missing --eps: the radius to train for")
    config = TrainConfig(
        output=args.output, eps=args.eps, model=shipped_model(args.model) if args.model else None, arch=args.arch,
        data=args.data, method=args.method, epochs=args.epochs, warmup=args.warmup, rampup=args.rampup,
        batch_size=args.batch_size, lr=args.lr, kappa=args.kappa, seed=args.seed, schedule=args.schedule,
        init=args.init, grad_clip=args.grad_clip, backend=args.backend, holdout=args.holdout, resume=args.resume,
        threads=args.threads, hr_alpha=args.hr_alpha, hr_r=args.hr_r, loss=args.loss,
        **{name: getattr(args, name) for name in ("tau", "hkr_alpha", "hkr_margin") if getattr(args, name) is not None})
    bars = not args.json and sys.stderr.isatty()
    report = None if args.json or bars else _print_epoch
    result = train(config, progress=bars, on_epoch=report)
    if args.json:
        print(json.dumps({"output": result.output, "checkpoint": result.checkpoint, "seconds": result.seconds,
                          "train_size": result.train_size, "holdout_size": result.holdout_size,
                          "holdout": result.holdout.as_dict() if result.holdout else None,
                          "history": [asdict(s) for s in result.history]}))
        return 0
    epochs = max(len(result.history), 1)
    print(f"wrote {result.output} ({len(result.trainable)} weight tensors trained on {result.train_size} samples, "
          f"{result.seconds:.1f} s, {result.seconds / epochs:.2f} s/epoch; checkpoint {result.checkpoint})")
    if result.holdout is not None:
        h = result.holdout
        print(f"held-out {h.n} samples, eps={h.eps:g}, method={h.method}: clean accuracy {h.clean_accuracy:.2%}, "
              f"certified accuracy {h.certified_accuracy:.2%}")
        print(f"reproduce: {result.reproduce}")
    return 0


def _print_epoch(stats) -> None:
    held = ""
    if stats.holdout_certified_accuracy is not None:
        held = (f" | held-out clean {stats.holdout_clean_accuracy:.1%} "
                f"certified {stats.holdout_certified_accuracy:.1%}")
    print(f"epoch {stats.epoch}: eps {stats.eps:.4g} kappa {stats.kappa:.2f} | loss {stats.loss:.4f} "
          f"clean {stats.clean_loss:.4f}/{stats.clean_accuracy:.1%} robust {stats.robust_loss:.4f}/"
          f"{stats.certified_accuracy:.1%}{held} | {stats.seconds:.2f} s", flush=True)


# ---- export-training -----------------------------------------------------------------------------------

def add_export_training(sub) -> None:
    p = sub.add_parser("export-training", help="write onnxruntime-training artifacts for certified training")
    p.add_argument("model", help="ONNX model file (or the name of a shipped model)")
    p.add_argument("-o", "--output", help="folder for training/eval/optimizer graphs, checkpoint and manifest")
    p.add_argument("--method", default="ibp", help="bound method: ibp or crown-ibp (default: ibp)")
    p.add_argument("--eps", type=float, help="target L-inf radius, recorded in the manifest (epsilon is an input)")
    p.add_argument("--domain", nargs=2, type=float, metavar=("LO", "HI"), help="clip the input box to [LO, HI]")
    p.add_argument("--grad-clip", type=float, default=10.0, help="clip the gradient's L2 norm (0: off)")
    p.set_defaults(run=run_export_training, reads=("model",), writes=())


def run_export_training(args) -> int:
    from graphcert.errors import InputError
    from graphcert.training.ort import export_training
    if args.output is None:
        raise InputError("missing -o DIR: the folder to write the artifacts to")
    if args.eps is None:
        raise InputError("missing --eps: the L-inf radius to train for")
    files = export_training(shipped_model(args.model), args.output, args.method, args.eps,
                            tuple(args.domain) if args.domain else None, args.grad_clip or None)
    print(f"wrote {args.output}: {', '.join(files)}")
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

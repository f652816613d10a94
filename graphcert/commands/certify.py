"""`graphcert certify` and `graphcert report`: accuracy and certified accuracy on a data set."""
from __future__ import annotations

import json
import sys

from graphcert import methods  # noqa: F401
from graphcert.commands.common import (DEFAULT_MODEL, DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB,  # noqa: F401
                                       add_alpha_options, add_parallel_options, alpha_settings, clipping_note,
                                       parallel_executor, parallel_requested, shipped_model)


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

"""`graphcert verify`: one VNN-LIB property, or a competition instances file."""
from __future__ import annotations

import os
import sys

from graphcert import methods  # noqa: F401
from graphcert.commands.common import (DEFAULT_MODEL, DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB,  # noqa: F401
                                       add_alpha_options, add_parallel_options, alpha_settings, clipping_note,
                                       parallel_executor, parallel_requested, shipped_model)


# ---- verify --------------------------------------------------------------------------------------------

# A script can branch on the verdict without parsing output; 2 stays "bad input" and 130 "interrupted".
VERDICT_EXIT_CODES = {"holds": 0, "violated": 10, "unknown": 20, "timeout": 30}
# Seconds before the deadline at which a supervised search stops, to print its own answer in time.
SEARCH_MARGIN = 0.25


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
    p.add_argument("--threads", type=int,
                   help="compute threads of the search's torch kernels (default: the cores no other task is "
                        "running on when it starts; on a machine shared with other jobs, 1)")
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
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
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
                                     rounding=args.rounding, threads=args.threads)
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
        from graphcert.verify.isolate import claim_answer
        claim_answer()
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
    # Supervised, the search ends a little before the deadline, so that its own answer (with the best partial
    # result) is printed before the supervisor would answer for it.
    timeout = args.timeout - SEARCH_MARGIN if process and args.timeout > 2 * SEARCH_MARGIN else args.timeout
    result = verifier.verify(shipped_model(args.model), args.spec, timeout=timeout, method=args.method,
                             alpha=alpha, memory=budget.total, started=started, rounding=args.rounding,
                             threads=args.threads)
    answer(result.status, result.reason, result)
    if process:
        # End now rather than spend the promised second tearing down large sessions.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(VERDICT_EXIT_CODES[result.status])
    return VERDICT_EXIT_CODES[result.status]

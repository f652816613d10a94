"""Wall time of `verify --instances` on ACAS Xu and of `certify --method crown` on MNIST, serially, with 1 and 2
local worker processes, and with 1 and 2 tasks at a time on a local Ray cluster started for the run.

Usage: python benchmarks/parallel_bench.py [--acas-timeout-scale 0.05] [--acas-limit N] [--certify-limit N]
                                            [--modes serial,local1,local2,ray1,ray2]
                                            [--workloads empty,verify,certify] [--empty-tasks 200]
Each configuration runs in a fresh Python process (as a user's command would: worker and cluster start-up
included). `empty` runs tasks that do nothing: the executor's own cost per task. `verify` and `certify` are
what `graphcert verify --instances ACAS.csv --timeout-scale K [--workers N] [--ray]` and `graphcert certify
mnist_mlp --method crown [--workers N] [--ray]` run. Prints one markdown table: wall time, time to the first
task's start, the tasks' own summed wall and CPU time, speed-up over one slot and over the serial command,
overhead per task ((wall x slots - summed task time) / tasks, start-up included), dispatch cost per task (the
same after the first task started) and whether the answers equal the serial run's. A load average
above 1.5 at the start makes speed-ups meaningless (2 cores): the script says so; the CPU times still hold.
Reads ../shared (the ACAS Xu family); skips the verify rows when it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp2021"
ACAS = SHARED / "acasxu" / "acasxu_instances.csv"
MODES = {"serial": (None, None), "local1": (1, None), "local2": (2, None), "ray1": (1, "local"), "ray2": (2, "local")}


def acas_rows(limit: int | None) -> list[list[str]]:
    rows = [line.split(",") for line in ACAS.read_text().splitlines() if line.strip()]
    if limit is None or limit >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / max(1, limit - 1))] for i in range(limit)]  # spread evenly


def one(workload: str, mode: str, args) -> dict:
    """One configuration, in this process: its timings and its answers."""
    from graphcert.distributed import make_executor
    from graphcert.models import shipped_path
    import graphcert.certify  # noqa: F401  imported before the clock starts, as workers import them before tasks
    import graphcert.verify  # noqa: F401
    workers, ray = MODES[mode]
    executor = make_executor(workers, ray)
    started = time.monotonic()
    if workload == "empty":  # the executor's own cost: tasks that do nothing
        from graphcert.distributed import Task, run_tasks
        tasks = [Task(str(i), time.sleep, (0,)) for i in range(args.empty_tasks)]
        _, summary = run_tasks(tasks, executor, lambda task, outcome: task.key)
        answers = []
    elif workload == "verify":
        from graphcert.distributed.instances import run_instances
        with tempfile.TemporaryDirectory() as tmp:
            csv = pathlib.Path(tmp) / "acas.csv"
            folder = ACAS.parent
            csv.write_text("".join(f"{folder / o},{folder / v},{t}\n" for o, v, t, *_ in acas_rows(args.acas_limit)))
            results, summary = run_instances(csv, pathlib.Path(tmp) / "out.csv", progress=False,
                                             timeout_scale=args.acas_timeout_scale, executor=executor)
        answers = [r.status for r in results]
    elif mode == "serial":  # what `graphcert certify` runs without --workers or --ray
        from graphcert.certify import certify
        from graphcert.data import load_dataset
        from graphcert.distributed import RunSummary
        cpu = time.process_time()
        result = certify(shipped_path("mnist_mlp"), load_dataset("mnist-test"), 0.01, "crown",
                         limit=args.certify_limit)
        summary = RunSummary("this process", tasks=1, done=1, wall_seconds=result.seconds,
                             task_seconds=result.seconds, task_cpu_seconds=time.process_time() - cpu)
        answers = [result.n, result.clean, result.certified]
    else:
        from graphcert.distributed.shards import certify_sharded
        result, summary = certify_sharded(shipped_path("mnist_mlp"), "mnist-test", 0.01, "crown",
                                          limit=args.certify_limit, executor=executor)
        answers = [result.n, result.clean, result.certified]
    return {"wall": time.monotonic() - started, "tasks": summary.done, "task_seconds": summary.task_seconds,
            "task_cpu": summary.task_cpu_seconds, "startup": summary.startup_seconds,
            "slots": getattr(executor, "workers", 1) or 1, "retried": summary.retried, "failed": summary.failed,
            "answers": answers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acas-timeout-scale", type=float, default=0.05,
                        help="fraction of the competition timeouts (116 s) given to each ACAS Xu instance")
    parser.add_argument("--acas-limit", type=int, help="a subset of this many instances, spread evenly (default: all)")
    parser.add_argument("--certify-limit", type=int, help="the first N MNIST test images (default: all 10,000)")
    parser.add_argument("--empty-tasks", type=int, default=200, help="tasks that do nothing, to time the executor")
    parser.add_argument("--workloads", default="empty,verify,certify")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return 0
    modes = args.modes.split(",")
    workloads = [w for w in args.workloads.split(",") if w != "verify" or ACAS.exists()]
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} on {os.cpu_count()} cores"
          + ("  (above 1.5: speed-ups below are not meaningful; CPU times are)" if load > 1.5 else ""))
    forwarded = [f"--acas-timeout-scale={args.acas_timeout_scale}", f"--empty-tasks={args.empty_tasks}"]
    forwarded += [f"--acas-limit={args.acas_limit}"] if args.acas_limit else []
    forwarded += [f"--certify-limit={args.certify_limit}"] if args.certify_limit else []
    rows = []
    for workload in workloads:
        runs = {}
        for mode in modes:
            proc = subprocess.run([sys.executable, __file__, "--one", workload, mode, *forwarded],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{workload} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {workload} {mode}: {runs[mode]['wall']:.1f} s", file=sys.stderr, flush=True)
        rows += table_rows(workload, runs)
    print("| workload | mode | slots | tasks | wall s | to first task s | task s (sum) | task CPU s (sum) | "
          "speed-up vs 1 slot | vs serial | overhead s/task | dispatch s/task | answers = serial |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


def table_rows(workload: str, runs: dict) -> list[list[str]]:
    rows = []
    serial = runs.get("serial", {}).get("answers")
    for mode, run in runs.items():
        one_slot = runs.get("ray1" if mode.startswith("ray") else "local1")
        speedup = f"{one_slot['wall'] / run['wall']:.2f}x" if one_slot and mode != "serial" else ""
        versus = f"{runs['serial']['wall'] / run['wall']:.2f}x" if "serial" in runs and mode != "serial" else ""
        overhead = (run["wall"] * run["slots"] - run["task_seconds"]) / max(run["tasks"], 1)
        dispatch = ((run["wall"] - run["startup"]) * run["slots"] - run["task_seconds"]) / max(run["tasks"], 1)
        same = "" if serial is None or mode == "serial" else ("yes" if run["answers"] == serial else
                                                               f"no ({differences(serial, run['answers'])})")
        rows.append([workload, mode, str(run["slots"]), str(run["tasks"]), f"{run['wall']:.1f}",
                     f"{run['startup']:.1f}", f"{run['task_seconds']:.1f}", f"{run['task_cpu']:.1f}", speedup, versus,
                     f"{overhead:.3f}", f"{dispatch:.3f}", same])
    return rows


def differences(a: list, b: list) -> str:
    return f"{sum(x != y for x, y in zip(a, b))} differ"


if __name__ == "__main__":
    sys.exit(main())

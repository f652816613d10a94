"""Parallel runs on this machine (graphcert.distributed): the same answers as a serial run, in input order,
nothing lost when a worker is killed, nothing repeated on --resume."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import cli
from conftest import MIXED_OPTIONS
from graphcert.distributed import ProcessExecutor, SerialExecutor, Task, run_tasks, tasks as task_module
from graphcert.distributed.journal import Journal
from graphcert.distributed.tasks import TASK_LOG_ENV
from parallel_tasks import (ACAS_QUICK, interrupt_then_resume, ACAS_SLOW, ACAS_SLOW_TOO, acas_instances, allocate, fail, kill_self, kill_worker_of,
                            logged_starts, results_rows, shared_test_family, sleep_then)

REPO = Path(__file__).resolve().parents[1]


def lines_of(outcome_lines):
    return [json.loads(line) for line in outcome_lines]


def encode(task, outcome):
    return json.dumps({"key": task.key, "value": outcome.value, "error": outcome.error,
                       "timed_out": outcome.timed_out, "attempts": outcome.attempts})


# ---- the executor ---------------------------------------------------------------------------------------

def test_worker_pool_returns_every_task_once_in_input_order_and_survives_failures(monkeypatch):
    # Later tasks finish first; a task that raises is an error with its message; one whose worker always dies is
    # retried up to the limit, then an error naming the signal; one over its memory budget is retried, then an
    # error; one stuck past its hard time limit has its worker stopped and is reported as timed out.
    monkeypatch.setattr(task_module, "GRACE_SECONDS", 0.5)
    tasks = [Task(str(i), sleep_then, (i * 10, 0.6 - 0.1 * i)) for i in range(5)]
    tasks += [Task("raises", fail, ("no such thing",)), Task("dies", kill_self), Task("hog", allocate, (2048,)),
              Task("stuck", sleep_then, (1, 600.0), timeout=0.5)]
    started = time.monotonic()
    lines, summary = run_tasks(tasks, ProcessExecutor(2, retries=1, memory_mb=1024), encode)
    assert time.monotonic() - started < 300
    rows = lines_of(lines)
    assert [r["key"] for r in rows] == [t.key for t in tasks]
    assert [r["value"] for r in rows[:5]] == [0, 10, 20, 30, 40] and all(r["error"] is None for r in rows[:5])
    assert rows[5]["error"].startswith("ValueError at parallel_tasks.py") and rows[5]["error"].endswith("no such thing")
    assert rows[5]["attempts"] == 1
    assert "SIGKILL" in rows[6]["error"] and rows[6]["attempts"] == 2
    assert rows[7]["error"].startswith("out of memory") and rows[7]["attempts"] == 2
    assert rows[8]["timed_out"] and "time limit" in rows[8]["error"] and rows[8]["attempts"] == 1
    assert (summary.done, summary.failed, summary.retried) == (9, 4, 2)


class LineCodec:
    header = "key,value"
    key = staticmethod(lambda line: line.split(",")[0] if line.count(",") == 1 else None)
    final = staticmethod(lambda line: True)


def test_journal_resume_keeps_whole_lines_and_drops_a_torn_one(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("key,value\nb,2\na,1\nc,")  # c's line was torn by a crash: redo c
    tasks = [Task(k, sleep_then, (v, 0)) for k, v in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]
    lines, summary = run_tasks(tasks, SerialExecutor(), lambda t, o: f"{t.key},{o.value}", Journal(path, LineCodec),
                               resume=True)
    assert lines == ["a,1", "b,2", "c,3", "d,4"] and (summary.resumed, summary.done) == (2, 2)
    assert path.read_text() == "key,value\na,1\nb,2\nc,3\nd,4\n"  # rewritten in input order


def test_cli_defaults_match_the_library():
    from graphcert import distributed
    assert (cli.DEFAULT_RETRIES, cli.DEFAULT_TASK_MEMORY_MB) == (distributed.DEFAULT_RETRIES,
                                                                 distributed.DEFAULT_TASK_MEMORY_MB)


# ---- verify --instances -----------------------------------------------------------------------------------

def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_workers_give_the_serial_answers_on_the_test_family_and_acas_xu(tmp_path, capsys, mixed_instances):
    instances, serial = mixed_instances
    out = tmp_path / "workers.csv"
    code, _ = run_cli(capsys, "verify", "--instances", instances, "--out", out, *MIXED_OPTIONS, "--workers", 2)
    assert code == 0
    workers = [(os.path.basename(r[0]), os.path.basename(r[1]), r[2]) for r in results_rows(out)]
    assert workers == serial  # the same verdicts, in input order
    assert [a[2] for a in serial] == ["holds", "holds", "holds", "violated", "holds"] + [
        v for _, _, v in ACAS_QUICK + [ACAS_SLOW]]


def test_a_worker_killed_mid_task_has_its_task_retried_and_nothing_lost(tmp_path, capsys, monkeypatch):
    log = tmp_path / "tasks.log"
    monkeypatch.setenv(TASK_LOG_ENV, str(log))
    rows = ACAS_QUICK[:2] + [ACAS_SLOW] + ACAS_QUICK[2:]
    instances = acas_instances(tmp_path / "acas.csv", rows, timeout=3)
    out = tmp_path / "results.csv"
    killer = kill_worker_of(log, ACAS_SLOW[0], after=1.0)
    code, captured = run_cli(capsys, "verify", "--instances", instances, "--out", out, "--workers", 2,
                             "--rounding", "real")
    killer.join(timeout=1)
    assert code == 0 and killer.killed is not None
    results = results_rows(out)
    assert [os.path.basename(r[0]) for r in results] == [o for o, _, _ in rows]  # each exactly once, in order
    assert [r[2] for r in results] == [v for _, _, v in rows]
    slow_starts = [(pid, attempt) for pid, key, attempt in logged_starts(log) if ACAS_SLOW[0] in key]
    assert [a for _, a in slow_starts] == [1, 2] and slow_starts[1][0] != killer.killed  # retried elsewhere
    assert "1 retried" in captured.err


def test_resume_after_sigterm_redoes_no_finished_instance(tmp_path):
    rows = ACAS_QUICK[:2] + [ACAS_SLOW, ACAS_SLOW_TOO] + ACAS_QUICK[2:]
    instances = acas_instances(tmp_path / "acas.csv", rows, timeout=3)
    out = tmp_path / "results.csv"
    command = [sys.executable, str(REPO / "cli.py"), "verify", "--instances", str(instances), "--out", str(out),
               "--workers", "2", "--rounding", "real"]
    interrupt_then_resume(command, dict(os.environ), tmp_path, out, rows, at_least=3)


def test_resume_needs_a_results_file_and_a_single_property_runs_alone(capsys):
    code, captured = run_cli(capsys, "verify", "--instances", shared_test_family(), "--resume")
    assert code == 2 and "--resume needs --out" in captured.err
    code, captured = run_cli(capsys, "verify", "mnist_mlp", "x.vnnlib", "--workers", "2")
    assert code == 2 and "--instances" in captured.err


def test_ray_without_ray_installed_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, captured = run_cli(capsys, "verify", "--instances", shared_test_family(), "--ray")
    assert code == 2 and captured.err.count("\n") == 1 and "pip install 'graphcert[ray]'" in captured.err


# ---- certify ------------------------------------------------------------------------------------------------

# 350 samples in batches of 50, shards of 100: four shards of two batches, the last one short (the same shard
# structure as 700 samples in batches of 100 and shards of 200, at half the certify work: no check needs more).
def certify_json(capsys, *args):
    code, captured = run_cli(capsys, "certify", "--method", "crown", "--limit", 350, "--batch-size", 50,
                             "--json", *args)
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_certify_with_workers_and_resume_equals_the_serial_run(tmp_path, capsys, monkeypatch):
    serial, _ = certify_json(capsys)
    parallel, _ = certify_json(capsys, "--workers", 2, "--shard-size", 100)
    keys = ("clean", "certified", "n", "clean_accuracy", "certified_accuracy")
    assert {k: parallel[k] for k in keys} == {k: serial[k] for k in keys}
    # A results file cut after two shards, with a torn third line: --resume runs only the missing shards.
    results = tmp_path / "shards.jsonl"
    certify_json(capsys, "--results", results, "--shard-size", 100)
    lines = results.read_text().splitlines()
    assert len(lines) == 1 + 4 and [json.loads(x)["shard"] for x in lines[1:]] == [[0, 100], [100, 200],
                                                                                    [200, 300], [300, 350]]
    results.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    log = tmp_path / "tasks.log"
    monkeypatch.setenv(TASK_LOG_ENV, str(log))
    resumed, err = certify_json(capsys, "--results", results, "--shard-size", 100, "--resume")
    assert [key for _, key, _ in logged_starts(log)] == ["200:300", "300:350"]
    assert {k: resumed[k] for k in keys} == {k: serial[k] for k in keys} and "2 resumed" in err
    without_time = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]
    assert [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for x in results.read_text().splitlines()] == without_time
    # Another run's file is refused in one line.
    code, captured = run_cli(capsys, "certify", "--method", "ibp", "--limit", 350, "--batch-size", 50,
                             "--results", results, "--resume")
    assert code == 2 and "another certify run" in captured.err and captured.err.count("\n") == 1


class LosingExecutor(SerialExecutor):
    """Serial, except that the task `lost` comes back as an error, as after a worker died on every attempt."""

    def __init__(self, lost: str):
        self.lost = lost

    def run(self, tasks):
        from graphcert.distributed import Outcome
        from graphcert.distributed.tasks import Event
        for event in super().run(tasks):
            if event.kind == "done" and event.key == self.lost:
                event = Event("done", event.key, Outcome(event.key, error="its worker (pid 1) died of SIGKILL (3 "
                                                                           "attempts)", attempts=3))
            yield event


def test_a_lost_shard_is_an_error_naming_it_and_resume_redoes_only_it(tmp_path):
    from graphcert.certify import certify
    from graphcert.data import load_dataset
    from graphcert.distributed.shards import certify_sharded
    from graphcert.errors import RunError
    model, results = str(REPO / "models" / "mnist_mlp.onnx"), tmp_path / "shards.jsonl"
    options = dict(eps=0.01, method="ibp", limit=300, batch_size=100, shard_size=100, results_path=str(results))
    with pytest.raises(RunError, match=r"1 of 3 shards failed \(samples 100-199: its worker .* died of SIGKILL"):
        certify_sharded(model, "mnist-test", executor=LosingExecutor("100:200"), **options)
    assert len(results.read_text().splitlines()) == 1 + 3  # the failure is recorded, not dropped
    seen = []

    class Watching(SerialExecutor):
        def run(self, tasks):
            seen.extend(t.key for t in tasks)
            return super().run(tasks)
    result, summary = certify_sharded(model, "mnist-test", executor=Watching(), resume=True, progress=True,
                                      **options)
    serial = certify(model, load_dataset("mnist-test"), 0.01, "ibp", limit=300, batch_size=100)
    assert seen == ["100:200"] and summary.resumed == 2
    assert (result.clean, result.certified, result.n) == (serial.clean, serial.certified, serial.n)

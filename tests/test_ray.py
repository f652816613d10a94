"""verify --instances and certify on a real local Ray cluster (started once for this module, 2 CPUs, a small object
store): the serial answers, and a Ray worker killed mid-task costs nothing. Skipped when Ray is not installed
(`pip install -e '.[ray]'`; .ci/run installs it)."""
from __future__ import annotations

import json
import os

import pytest

import cli
from conftest import MIXED_OPTIONS
from graphcert.distributed import tasks as task_module
from graphcert.distributed.tasks import ONE_THREAD_ENV, TASK_LOG_ENV
from parallel_tasks import ACAS_QUICK, ACAS_SLOW, acas_instances, kill_worker_of, logged_starts, results_rows

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2 ** 20, log_to_driver=False,
             runtime_env={"env_vars": dict(ONE_THREAD_ENV)})
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_backstop_stops(monkeypatch):
    """These tests check answers and retries, not the hard-limit backstop (test_parallel checks that). The executor
    counts a task's hard limit from its submission, so on a loaded machine a Ray worker slow to start could have its
    instance stopped as a timeout before it ran (seen in a full run at load 11: "2 failed, 0 retried", the slow
    task's start never logged)."""
    monkeypatch.setattr(task_module, "GRACE_SECONDS", 600.0)


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_ray_gives_the_serial_answers(tmp_path, capsys, mixed_instances):
    instances, serial = mixed_instances
    out = tmp_path / "ray.csv"
    code, captured = run_cli(capsys, "verify", "--instances", instances, "--out", out, *MIXED_OPTIONS, "--ray")
    assert code == 0, captured.err
    assert [(os.path.basename(r[0]), os.path.basename(r[1]), r[2]) for r in results_rows(out)] == serial
    assert "Ray" in captured.err
    counts = {}
    for mode, extra in (("serial", []), ("ray", ["--ray", "--shard-size", 100])):  # 4 shards of 2 batches, 1 short
        code, captured = run_cli(capsys, "certify", "--method", "crown", "--limit", 350, "--batch-size", 50,
                                 "--json", *extra)
        assert code == 0, captured.err
        result = json.loads(captured.out)
        counts[mode] = (result["n"], result["clean"], result["certified"])
    assert counts["ray"] == counts["serial"]


def test_a_ray_worker_killed_mid_task_has_its_task_retried(tmp_path, capsys, monkeypatch):
    log = tmp_path / "tasks.log"
    monkeypatch.setenv(TASK_LOG_ENV, str(log))
    rows = ACAS_QUICK[:1] + [ACAS_SLOW] + ACAS_QUICK[1:2]
    instances = acas_instances(tmp_path / "acas.csv", rows, timeout=3)
    out = tmp_path / "results.csv"
    # The slow task's worker is killed as soon as it logs the task's start: the task is then running whatever the
    # load (a fixed delay after the start only made the test slower and let a starved killer thread miss the task).
    killer = kill_worker_of(log, ACAS_SLOW[0], after=0.0, give_up=600.0)
    code, captured = run_cli(capsys, "verify", "--instances", instances, "--out", out, "--ray", "--rounding", "real")
    killer.join(timeout=1)
    assert code == 0 and killer.killed is not None, captured.err
    assert [(os.path.basename(r[0]), r[2]) for r in results_rows(out)] == [(o, v) for o, _, v in rows]
    slow_starts = [attempt for _, key, attempt in logged_starts(log) if ACAS_SLOW[0] in key]
    assert slow_starts == [1, 2] and "1 retried" in captured.err


def test_resume_on_ray_after_sigterm_redoes_no_finished_instance(tmp_path):
    """A `verify --instances --ray` run (its own local cluster, in a child process) stopped by SIGTERM, then
    resumed on Ray: the finished instances are kept, only the rest run, the file ends complete and in order."""
    import sys
    from pathlib import Path

    from parallel_tasks import ACAS_SLOW_TOO, interrupt_then_resume
    repo = Path(__file__).resolve().parents[1]
    rows = ACAS_QUICK[:2] + [ACAS_SLOW, ACAS_SLOW_TOO] + ACAS_QUICK[2:]
    instances = acas_instances(tmp_path / "acas.csv", rows, timeout=3)
    out = tmp_path / "results.csv"
    command = [sys.executable, str(repo / "cli.py"), "verify", "--instances", str(instances), "--out", str(out),
               "--ray", "--rounding", "real"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    interrupt_then_resume(command, env, tmp_path, out, rows, at_least=2, start_seconds=180)

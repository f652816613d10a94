"""`certify` as tasks: the data set split into shards of whole batches, each certified by `certify.certify`.

A shard is a run of consecutive batches of the serial run (its bounds are multiples of the batch size), so every
sample is bounded in the same batch as serially and the counts add up to the serial run's exactly. Workers read
the model and the data set themselves (by path or name), so only file names and counts travel. The optional
results file holds one JSON line per shard, under a header line that fingerprints the run (model and data
contents, radius, method, norm, clipping, batch and shard size, alpha-CROWN settings): `--resume` refuses a file
of another run and redoes only missing or failed shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

from ..errors import InputError, RunError
from .journal import Journal
from .runner import RunSummary, run_tasks
from .tasks import Outcome, Task

# Shards are this many batches by default: enough of them to balance two or more workers on a test set, large
# enough that a worker's per-shard set-up (loading the model, building the bound graph) stays small beside them.
BATCHES_PER_SHARD = 4

_DATA_CACHE: dict = {}


def shard_bounds(n: int, batch_size: int, shard_size: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering n samples; every lo is a multiple of the batch size."""
    batches = max(1, math.ceil((shard_size or batch_size * BATCHES_PER_SHARD) / batch_size))
    step = batches * batch_size
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def certify_shard(model_path: str, data_name: str, lo: int, hi: int, eps: float, method: str, batch_size: int,
                  clip: bool, alpha, norm: str) -> dict:
    """The task: clean and certified counts of samples [lo, hi) of the data set."""
    from ..certify import certify
    from ..data import Dataset
    data = _dataset(data_name)
    part = Dataset(data.name, data.x[lo:hi], data.y[lo:hi], data.domain)
    result = certify(model_path, part, eps, method=method, batch_size=batch_size, clip=clip, alpha=alpha, norm=norm)
    return {"clean": result.clean, "certified": result.certified, "n": result.n}


def _dataset(name: str):
    """A worker keeps the last data set it read: its shards all come from it."""
    if name not in _DATA_CACHE:
        from ..data import load_dataset
        _DATA_CACHE.clear()
        _DATA_CACHE[name] = load_dataset(name)
    return _DATA_CACHE[name]


class ShardCodec:
    def __init__(self, fingerprint: dict):
        self.header = json.dumps({"graphcert certify shards": fingerprint}, sort_keys=True)

    @staticmethod
    def encode(task: Task, outcome: Outcome) -> str:
        lo, hi = (int(v) for v in task.key.split(":"))
        row = {"shard": [lo, hi], "seconds": round(outcome.seconds, 3)}
        row.update(outcome.value if outcome.ok else {"error": outcome.error})
        return json.dumps(row, sort_keys=True)

    @staticmethod
    def key(line: str) -> str | None:
        try:
            lo, hi = json.loads(line)["shard"]
        except (ValueError, KeyError, TypeError):
            return None
        return f"{lo}:{hi}"

    @staticmethod
    def final(line: str) -> bool:
        return "error" not in json.loads(line)


def fingerprint(model_path: str, data, eps: float, method: str, norm: str, clip: bool, batch_size: int,
                shards: list, alpha) -> dict:
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    contents = hashlib.sha256(data.x.tobytes()).hexdigest()[:16] + hashlib.sha256(data.y.tobytes()).hexdigest()[:16]
    return {"model_sha256": digest.hexdigest()[:32], "data": contents, "n": len(data), "eps": eps, "method": method,
            "norm": norm, "clip": clip, "batch_size": batch_size, "shards": len(shards),
            "alpha": dataclasses.asdict(alpha) if alpha is not None else None}


def certify_sharded(model_path: str, data_name: str, eps: float, method: str = "ibp", limit: int | None = None,
                    batch_size: int = 256, clip: bool = True, alpha=None, norm: str = "linf", executor=None,
                    results_path: str | None = None, resume: bool = False, progress: bool = False,
                    shard_size: int | None = None):
    """Clean and certified accuracy, shard by shard on `executor`; equal to `certify.certify` on the same arguments.
    The CertifyResult (its seconds: the run's wall time) and the run's summary."""
    from ..alpha import CERTIFY_ALPHA
    from ..certify import CertifyResult, certify
    from ..data import load_dataset
    from . import SerialExecutor
    if resume and results_path is None:
        raise InputError("--resume needs --results FILE: the shard results file to resume from")
    if shard_size is not None and shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    alpha = alpha or CERTIFY_ALPHA
    model_path = os.path.abspath(model_path)
    if not os.path.isfile(model_path):
        raise InputError(f"model file not found: {model_path}")
    data_name = os.path.abspath(data_name) if os.path.exists(data_name) else data_name
    data = load_dataset(data_name).head(limit)
    # Bad input (shapes, labels, norm, method) fails here, in one line, before any worker starts.
    certify(model_path, data.head(1), eps, method=method, batch_size=batch_size, clip=clip, alpha=alpha, norm=norm)
    bounds = shard_bounds(len(data), batch_size, shard_size)
    tasks = [Task(f"{lo}:{hi}", certify_shard, (model_path, data_name, lo, hi, eps, method, batch_size, clip, alpha,
                                                 norm)) for lo, hi in bounds]
    codec = ShardCodec(fingerprint(model_path, data, eps, method, norm, clip, batch_size, bounds, alpha))
    journal = None
    if results_path is not None:
        journal = Journal(results_path, codec, _header_check(results_path, codec.header))
    lines, summary = run_tasks(tasks, executor or SerialExecutor(), codec.encode, journal, resume, progress,
                               unit="shard")
    rows = [json.loads(line) for line in lines]
    failed = [row for row in rows if "error" in row]
    if failed:
        first = failed[0]
        where = f"; the rest are kept in {results_path}: rerun with --resume to redo the failed ones" \
            if results_path else ""
        raise RunError(f"{len(failed)} of {len(rows)} shards failed (samples {first['shard'][0]}-"
                       f"{first['shard'][1] - 1}: {first['error']}){where}")
    clean, certified, n = (sum(row[name] for row in rows) for name in ("clean", "certified", "n"))
    result = CertifyResult(clean / n, certified / n, n, clean, certified, eps, method, summary.wall_seconds, norm)
    return result, summary


def _header_check(path: str, header: str):
    def check(first: str) -> None:
        if first != header:
            raise InputError(f"cannot resume from {path}: it holds shards of another certify run (model, data, "
                             f"eps, method, norm, clipping, batch or shard size, or alpha settings differ); "
                             f"remove it, or drop --resume")
    return check

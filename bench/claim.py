"""Benchmark: jobs claimed per second, and claim latency, on the shared PostgreSQL index with
1 and 4 worker processes against the embedded SQLite index with one worker (the peer).

Usage: .venv/bin/python bench/claim.py [--jobs 400] [--workers 4]

Each worker process opens its own store and loops as the node's worker does between stages:
claim the oldest routed job under a lease, move it on (`inferring`), release the lease, until no
job is left. The jobs are made beforehand (not timed). PostgreSQL is a throw-away cluster on
loopback (tests/postgres.py), with fsync off like the test cluster: this measures the claim
protocol (row locks, SKIP LOCKED, round trips), not a disk. Times are wall seconds on this
machine; with 2 cores, 4 worker processes plus the server share the CPUs, so read the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ie_gateway.store import Arrival, JobState, Store
from tests.jobs import job_route
from tests.postgres import PostgresCluster, find_bindir


def make_jobs(root: Path, index: str, count: int) -> None:
    """``count`` routed jobs, one series each, waiting for a worker."""
    store = Store(root, index)
    for i in range(1, count + 1):
        series = f"1.2.826.0.1.{i}"
        arrival = Arrival(
            sop_uid=f"{series}.1",
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            study_uid="1.2.826.0.1",
            series_uid=series,
            transfer_syntax="1.2.840.10008.1.2.1",
            calling_ae="PACS",
            called_ae="IE_GATEWAY",
        )
        job_id, _, _ = store.accept(arrival, (b"x",), lambda: {"Modality": "CT"})
        store.index.transition(job_id, JobState.COMPLETE, completed_at=float(i))
        store.index.transition(job_id, JobState.ROUTED, routes=[job_route()])
    store.index.close()


def work(root: Path, index: str, node: str, start: Any, ready: Any, out: Any) -> None:
    """One worker: claim, move on, release, until nothing is left; report the claim latencies."""
    store = Store(root, index)
    store.index.check_writable()  # connected
    latencies = []
    ready.put(node)
    start.wait()
    while True:
        began = time.perf_counter()
        job = store.index.claim([JobState.ROUTED], node, lease_s=30)
        latencies.append(time.perf_counter() - began)
        if job is None:
            break
        store.index.transition(job.id, JobState.INFERRING)
        store.index.release(job.id, node)
    out.put(latencies[:-1])  # the last claim found nothing


def run(index: str, root: Path, jobs: int, workers: int) -> dict[str, float]:
    make_jobs(root, index, jobs)
    ctx = multiprocessing.get_context("spawn")
    start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=work, args=(root, index, f"bench:{n}", start, ready, out)) for n in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:  # every worker imported and connected before the clock starts
        ready.get()
    began = time.perf_counter()
    start.set()
    latencies = [lat for _ in procs for lat in out.get()]
    seconds = time.perf_counter() - began
    for p in procs:
        p.join()
    claimed = Store(root, index).index.job_counts().get(JobState.INFERRING, 0)
    assert claimed == jobs == len(latencies), (claimed, jobs, len(latencies))  # each job claimed once
    ms = sorted(lat * 1000 for lat in latencies)
    return {
        "per_s": jobs / seconds,
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[int(0.95 * (len(ms) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    cluster = PostgresCluster(find_bindir()).start()
    results: list[tuple[str, int, dict[str, float]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-claim-") as tmp:
            results.append(("sqlite", 1, run("sqlite", Path(tmp) / "sqlite", args.jobs, 1)))
            for workers in (1, args.workers):
                url = cluster.create_database(f"claim{workers}")
                results.append(("postgresql", workers, run(url, Path(tmp) / f"pg{workers}", args.jobs, workers)))
    finally:
        cluster.stop()
    peer = results[0][2]["per_s"]
    print(f"{args.jobs} jobs each; claim + move on + release per job")
    print(f"{'index':<11} {'workers':>7} {'claims/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'vs sqlite':>9}")
    for name, workers, r in results:
        print(
            f"{name:<11} {workers:>7} {r['per_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} "
            f"{r['per_s'] / peer:>8.2f}x"
        )


if __name__ == "__main__":
    main()

"""Benchmark: what synchronous=FULL costs the transactions that decide what is sent.

Usage: .venv/bin/python bench/durable.py [--jobs 200] [--dir DIR]

An SQLite index in ``DIR`` (default: a temp folder; give the disk the node's storage.root is on)
takes ``--jobs`` jobs through the transitions and outbox writes a delivered job makes
(complete, routed, inferring, inferred, two outbox rows queued, sending, two rows delivered,
delivered): once as the node now does them (``tx(durable=True)``: synchronous=FULL for those
commits), once with every commit at WAL's synchronous=NORMAL (the peer). Prints the time per job
of each and the ratio. A job's own work (inference, writing, C-STORE) takes seconds; this is
the part of it the index adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ie_gateway.store import Arrival, JobState, Store
from ie_gateway.store.db import SQLite
from ie_gateway.store.outbox import Outbox
from tests.jobs import job_route


def one_job(store: Store, outbox: Outbox, i: int) -> None:
    """The index writes of one series from receipt to delivered (two result files)."""
    series = f"1.2.826.0.2.{i}"
    arrival = Arrival(f"{series}.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.2", series, "1.2.840.10008.1.2.1",
                      "PACS", "IE_GATEWAY")  # fmt: skip
    job_id, _, _ = store.accept(arrival, (b"x",), lambda: {"Modality": "CT"})
    index = store.index
    index.transition(job_id, JobState.COMPLETE)
    index.transition(job_id, JobState.ROUTED, routes=[job_route()])
    index.transition(job_id, JobState.INFERRING)
    index.transition(job_id, JobState.INFERRED)
    for kind in ("rt", "seg"):
        outbox.enqueue(job_id, "TPS", f"job-{job_id}/{kind}.dcm", f"{series}.{kind}", "1.2.3")
    index.transition(job_id, JobState.SENDING)
    for row in outbox.claim_due("TPS", "bench", 60):
        outbox.record(row, 0, None, delivered=True)
    index.transition(job_id, JobState.DELIVERED)


class NormalOnly(SQLite):
    """The peer: every commit at synchronous=NORMAL, as before durable transactions."""

    @contextmanager
    def tx(self, durable: bool = False) -> Iterator[Any]:
        with super().tx(False) as db:
            yield db


def run(root: Path, jobs: int, normal_only: bool) -> float:
    """Seconds per job."""
    store = Store(root)
    if normal_only:
        store.index.db = NormalOnly(root / "index.sqlite3")
    outbox = Outbox(store.index)
    started = time.perf_counter()
    for i in range(jobs):
        one_job(store, outbox, i)
    seconds = (time.perf_counter() - started) / jobs
    store.index.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    figures: dict[str, list[float]] = {"full": [], "normal": []}
    for _ in range(args.rounds):  # alternate, so a noisy moment hits both
        for name in ("normal", "full"):
            with tempfile.TemporaryDirectory(dir=args.dir) as folder:
                figures[name].append(run(Path(folder), args.jobs, normal_only=name == "normal"))
    full, normal = (statistics.median(figures[k]) for k in ("full", "normal"))
    print(f"jobs per round: {args.jobs}, rounds: {args.rounds}, folder: {args.dir or tempfile.gettempdir()}")
    print(f"synchronous=NORMAL everywhere (peer): {normal * 1000:7.2f} ms of index writes per job")
    print(f"FULL for what decides sending (node): {full * 1000:7.2f} ms of index writes per job")
    print(f"ratio node/peer: {full / normal:.2f}  (+{(full - normal) * 1000:.2f} ms per job)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

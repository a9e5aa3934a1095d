"""The pipelined worker: its lanes overlap the stages of different jobs (the model runs on one
while the next one's volume is prepared and the last one's results are written), the prepare
lane keeps at most ``worker.prepare_ahead`` volumes ready and prepares in queue order, and the
write stage queues the RT-STRUCT before it builds what the planning system does not need first.

Overlap is read from the index's transitions, in the order the index recorded them, never
from sleeps or wall-clock thresholds.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from ie_gateway.pipeline import BACKGROUND_NICENESS, Lane, Worker
from ie_gateway.store import JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import Priority, output_sop_class
from ie_gateway.vocab import OutputKind, Stage
from tests.peers import Orthanc, storescu, wait_until
from tests.test_priority import node_parts, queued
from tests.test_service import node_with, rule, series


def lane(worker: Worker, name: str) -> Lane:
    [found] = [lane for lane in worker.lanes if lane.name == name]
    return found


def prepared_job(store: Store, n: int, completed_at: float) -> int:
    job_id = queued(store, n, Priority.NORMAL, completed_at)
    store.index.transition(job_id, JobState.PREPARED)
    return job_id


def tried(store: Store, job_id: int) -> set[str]:
    """The stages a job has been through (attempts counted by the index)."""
    return set(store.index.stage_attempts(job_id))


def test_the_prepare_lane_keeps_one_volume_ahead_and_prepares_the_most_urgent_job_first(tmp_path: Path) -> None:
    _, store, worker = node_parts(tmp_path)
    assert [lane.name for lane in worker.lanes] == ["infer", "write", "prepare"]
    now = time.time()
    ready = prepared_job(store, 1, now - 60)
    low = queued(store, 2, Priority.LOW, now - 30)
    high = queued(store, 3, Priority.HIGH, now - 10)
    prepare = lane(worker, "prepare")
    assert not prepare.run_once()  # a volume waits for the model already (prepare_ahead: 1)
    assert tried(store, low) == tried(store, high) == set()
    store.index.transition(ready, JobState.INFERRING)
    store.index.transition(ready, JobState.INFERRED)
    assert prepare.run_once()
    # the most urgent job is prepared first (these fake instances are not a CT: it is refused)
    assert tried(store, high) == {Stage.PREPARE} and tried(store, low) == set()
    assert store.index.job(high).state in (JobState.REFUSED, JobState.FAILED)


def test_the_inference_lane_prepares_a_volume_itself_when_none_is_ready(tmp_path: Path) -> None:
    _, store, worker = node_parts(tmp_path)
    waiting = queued(store, 1, Priority.NORMAL, time.time() - 5)
    assert lane(worker, "infer").run_once()
    assert tried(store, waiting) == {Stage.PREPARE}


def test_one_lane_does_every_stage_when_the_pipeline_is_off(tmp_path: Path) -> None:
    cfg, store, worker = node_parts(tmp_path)
    serial = Worker(
        cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"pipeline": False})}),
        store,
        worker.registry,
        worker.runner,
        worker.rules,
    )
    assert [lane.name for lane in serial.lanes] == ["all"]
    assert [claim.stage for claim in serial.lanes[0].claims] == [stage for _, stage in Worker.STAGES]


def test_the_prepare_lane_runs_at_a_lower_cpu_priority_than_the_model_and_the_rtstructs(tmp_path: Path) -> None:
    _, _, worker = node_parts(tmp_path)

    def nice(which: str) -> int:
        native_id = lane(worker, which).thread.native_id
        assert native_id is not None
        return os.getpriority(os.PRIO_PROCESS, native_id)

    worker.start()
    try:
        wait_until(lambda: nice("prepare") == BACKGROUND_NICENESS, 60, what="the prepare lane to lower its priority")
        assert nice("write") == nice("infer") == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        worker.stop()


def moves(index: Path) -> list[tuple[int, int, str]]:
    """Every transition as (order recorded, job, state entered)."""
    with sqlite3.connect(index, timeout=5) as db:
        return [(int(i), int(j), str(s)) for i, j, s in db.execute("SELECT id, job_id, to_state FROM transitions")]


def entered(history: list[tuple[int, int, str]], job_id: int, state: str) -> int:
    """When (in recorded order) ``job_id`` last entered ``state``."""
    return max(i for i, j, s in history if j == job_id and s == state)


@pytest.mark.peer
@pytest.mark.slow
def test_the_next_volume_is_prepared_and_the_last_results_written_while_the_model_runs(
    node_factory: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    node = node_with(
        node_factory,
        tmp_path,
        [rule("slow", "Slow", "slow-body")],
        spin=1000,
        destinations={"TPS": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
    ).start()
    for n in (1, 2, 3):
        series(tmp_path / "ct" / f"s{n}", 30 + n, "Slow")
    assert storescu(node.port, tmp_path / "ct").returncode == 0
    node.wait_state({"delivered"}, count=3, timeout=300)
    history = moves(node.root / "index.sqlite3")
    order = sorted({j for _, j, _ in history}, key=lambda j: entered(history, j, "inferring"))
    for done, following in zip(order, order[1:]):
        # the following job's volume was ready before the model finished the one before it ...
        assert entered(history, following, "prepared") < entered(history, done, "inferred")
        # ... and the model took it up before the results of the one before were all written
        assert entered(history, following, "inferring") < entered(history, done, "sending")
        assert entered(history, done, "inferred") < entered(history, following, "inferring")  # one at a time
    lanes = {e["stage"]: e["lane"] for e in node.log_events() if e["event"] == "stage done"}
    assert lanes["infer"] == "infer" and lanes["write"] == "write"
    assert lanes["route"] == lanes["finish"] == "prepare"


@pytest.mark.peer
def test_the_rtstruct_is_queued_in_a_stage_before_the_seg_and_the_qa_picture_are_made(
    node_factory: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    both = {**rule("fast", "Fast", "toy-body"), "outputs": ["seg", "rtstruct"]}
    node = node_with(
        node_factory,
        tmp_path,
        [both],
        destinations={"TPS": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
    ).start()
    assert storescu(node.port, series(tmp_path / "ct", 41, "Fast")).returncode == 0
    [job] = node.wait_state({"delivered"}, timeout=120)
    events = [e for e in node.log_events() if e.get("job") == job["id"] and "stage" in e]
    said = [f"{e['stage']}: {e['event']}" + (f" {e['kind']}" if "kind" in e else "") for e in events]
    # the planning system's file first, though the rule lists the SEG first, in a stage of its
    # own; the SEG and the picture after it, in the next
    assert said.index("write: output queued rtstruct") < said.index("write: stage done")
    assert (
        said.index("write: stage done")
        < said.index("finish: output queued seg")
        < said.index("finish: qa picture made")
    )
    assert "write: output queued seg" not in said
    # and the next stage began only once the RT-STRUCT's C-STORE had ended
    told = [f"{e.get('stage', '')}: {e['event']}" for e in node.log_events() if e.get("job") == job["id"]]
    assert told.index(": delivered") < told.index("finish: stage begun")


def test_the_finish_stage_lets_the_jobs_rtstruct_have_its_first_c_store_first(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = queued(store, 1, Priority.NORMAL, time.time() - 60)
    for state in (JobState.PREPARED, JobState.INFERRING, JobState.INFERRED, JobState.WRITING):
        store.index.transition(job_id, state)
    outbox = Outbox(store.index)
    outbox.enqueue(job_id, "TPS", "1/rtstruct.dcm", "1.2.9.1.2", output_sop_class(OutputKind.RTSTRUCT))

    def finish(now: float | None = None) -> int | None:
        job = store.index.claim([JobState.WRITING], "w:1", lease_s=30, now=now, behind_first_delivery_s=10)
        if job is not None:
            store.index.release(job.id, "w:1")
        return None if job is None else job.id

    assert store.index.claim([JobState.WRITING], "w:1", lease_s=30) is not None  # no other claim waits
    store.index.release(job_id, "w:1")
    assert finish() is None  # queued, not yet tried
    [row] = outbox.claim_due("TPS", "n:1", lease_s=30)
    assert finish() is None  # being sent
    # a destination that hangs holds the rest up no longer than the head start
    assert finish(now=time.time() + 11) == job_id
    # the attempt ended (here refused, to go again later): the rest follows at once
    outbox.record(row, 0xA700, "out of resources", delivered=False, next_at=time.time() + 60)
    assert finish() == job_id


def test_a_delivery_pass_takes_the_rtstructs_before_the_segs_queued_ahead_of_them(
    tmp_path: Path, index_url: str
) -> None:
    store = Store(tmp_path, index_url)
    earlier = queued(store, 1, Priority.NORMAL, time.time() - 60)
    later = queued(store, 2, Priority.NORMAL, time.time() - 30)
    outbox = Outbox(store.index)
    outbox.enqueue(earlier, "TPS", "1/seg.dcm", "1.2.9.1.2", output_sop_class(OutputKind.SEG))
    outbox.enqueue(later, "TPS", "2/rtstruct.dcm", "1.2.9.2.1", output_sop_class(OutputKind.RTSTRUCT))
    outbox.enqueue(later, "TPS", "2/seg.dcm", "1.2.9.2.2", output_sop_class(OutputKind.SEG))
    rows = outbox.claim_due("TPS", "n:1", lease_s=30)
    assert [r.path for r in rows] == ["2/rtstruct.dcm", "1/seg.dcm", "2/seg.dcm"]

"""The spool and index on their own: state machine, completion, late instances, retention,
claims and leases, the outbox, typed details, migrations.

Every test that takes ``index_url`` runs twice: on the embedded SQLite index and on a throw-away
PostgreSQL cluster (tests/postgres.py); both backends must behave the same.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from ie_gateway.config import DeliverySettings
from ie_gateway.errors import BatchCommitError, StoreError, UnsafeUIDError
from ie_gateway.send import Sender
from ie_gateway.store import (
    Arrival,
    JobDetail,
    JobState,
    OutputKind,
    ReviewPolicy,
    Store,
    TransitionError,
    check_uid,
)
from ie_gateway.store.groupcommit import GroupCommit
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import AgreementRow, ApprovedSet, Review, StageAttempts, SyncRecord
from ie_gateway.store.schema import LATEST
from ie_gateway.vocab import OutboxState
from tests.jobs import job_route
from tests.peers import wait_until


def arrival(sop: str, series: str = "1.2.3.4", study: str = "1.2.3") -> Arrival:
    return Arrival(sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid=study, series_uid=series,
                   transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS", called_ae="IE_GATEWAY")


def accept(store: Store, sop: str, header: dict | None = None, **kw: str) -> tuple[int, bool, bool]:
    return store.accept(arrival(sop, **kw), (b"DICM-bytes-" + sop.encode(),), lambda: header or {"Modality": "CT"})


@pytest.mark.parametrize("bad", ["", "1.2.a", "../1", "1/2", "1." + "9" * 64, "1.2\\3", "1.2.3\n", "1.2.3\r\n"])
def test_unsafe_uids_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeUIDError):
        check_uid(bad, "SOPInstanceUID")


def test_accepted_instance_is_on_disk_and_indexed(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id, duplicate, late = accept(store, "1.2.3.4.1")
    assert (duplicate, late) == (False, False)
    path = store.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert path.read_bytes() == b"DICM-bytes-1.2.3.4.1"
    job = store.index.job(job_id)
    assert (job.state, job.instances, job.header) == (JobState.RECEIVING, 1, {"Modality": "CT"})


def test_duplicate_with_the_same_bytes_is_idempotent(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    first, _, _ = accept(store, "1.2.3.4.1")
    _, duplicate, _ = accept(store, "1.2.3.4.1")
    assert duplicate
    assert store.index.job(first).instances == 1
    assert [p.name for p in store.spool.iter_instances()] == ["1.2.3.4.1.dcm"]
    assert list(store.spool.tmp.iterdir()) == []


def test_duplicate_with_other_bytes_is_kept_beside_and_the_later_copy_used(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    first, _, _ = accept(store, "1.2.3.4.1")
    source = tmp_path / "received.dcm"
    source.write_bytes(b"corrected bytes")
    accepted = store.accept_file(arrival("1.2.3.4.1"), source, dict)
    assert (accepted.job_id, accepted.duplicate, accepted.replaced) == (first, False, True)
    assert not source.exists()  # moved into the spool, not copied
    folder = store.spool.root / "1.2.3" / "1.2.3.4"
    assert (folder / "1.2.3.4.1.dcm").read_bytes() == b"DICM-bytes-1.2.3.4.1"  # the first copy stays
    job = store.index.job(first)
    assert (job.instances, job.detail.replaced_instances) == (1, 1)
    [used] = store.instance_files(job)
    assert used.read_bytes() == b"corrected bytes" and used.parent == folder
    assert store.recover()["adopted"] == 0  # the earlier copy is not taken for a new instance
    store.index.transition(first, JobState.COMPLETE)
    store.index.transition(first, JobState.UNROUTED, reason="test")
    assert store.purge_expired(unrouted_days=0, finished_days=0, now=job.updated_at + 86400) == 1
    assert list(folder.iterdir()) == []  # retention takes every copy


def test_failed_write_leaves_no_file_and_no_row(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)

    def chunks():  # the sender's bytes stop half way with an I/O error
        yield b"half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.accept(arrival("1.2.3.4.9"), chunks(), dict)
    assert list(store.spool.iter_instances()) == []
    assert list(store.spool.tmp.iterdir()) == []
    assert not store.index.has_instance("1.2.3.4.9")


def accept_at_once(store: Store, sops_by_series: dict[str, list[str]]) -> dict[str, object]:
    """Accept each series' instances in a thread of its own, all at once, as receivers of several
    associations do; SOP UID → what accept returned or raised."""
    results: dict[str, object] = {}

    def receive(series: str, sops: list[str]) -> None:
        for sop in sops:
            try:
                results[sop] = accept(store, sop, series=series)
            except StoreError as exc:
                results[sop] = exc

    threads = [threading.Thread(target=receive, args=item) for item in sops_by_series.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_instances_accepted_from_several_threads_at_once_are_each_on_disk_and_indexed(
        tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    series = {f"1.2.3.{s}": [f"1.2.3.{s}.{i}" for i in range(1, 11)] for s in range(5, 9)}
    results = accept_at_once(store, series)
    for series_uid, sops in series.items():
        job_ids = {results[sop][0] for sop in sops}  # type: ignore[index]
        assert len(job_ids) == 1
        assert store.index.job(job_ids.pop()).instances == 10
        for sop in sops:
            path = store.spool.root / "1.2.3" / series_uid / f"{sop}.dcm"
            assert path.read_bytes() == b"DICM-bytes-" + sop.encode()
            assert store.index.instance_path(sop) == str(path.relative_to(store.spool.root))


def test_a_failed_group_commit_fails_every_instance_waiting_on_it_and_indexes_none(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:  # the index refuses the rows (as a full disk would)
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    series = {f"1.2.3.{s}": [f"1.2.3.{s}.{i}" for i in range(1, 4)] for s in range(5, 9)}
    results = accept_at_once(store, series)
    assert all(isinstance(results[sop], BatchCommitError) for sops in series.values() for sop in sops)
    # rolled back whole: no series, job or instance row of any batch is left half-written
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("series", "jobs", "instances")] == [
            0, 0, 0]
        db.execute("DROP TRIGGER refuse")
    job_id, duplicate, _ = accept(store, "1.2.3.5.1", series="1.2.3.5")  # the sender's retry is taken
    assert not duplicate and store.index.job(job_id).instances == 1


def test_a_failed_batch_fails_each_of_its_waiters_and_the_committer_goes_on() -> None:
    first_held = threading.Event()
    batches: list[list[str]] = []

    def commit(items: list[str]) -> list[str]:
        batches.append(list(items))
        if items == ["first"]:
            first_held.wait(30)  # the index is slow: the next instances queue up meanwhile
        if "bad" in items:
            raise StoreError("index write failed")
        return [item.upper() for item in items]

    group: GroupCommit[str, str] = GroupCommit(commit, "test-commit")  # type: ignore[arg-type]
    results: dict[str, object] = {}

    def submit(item: str) -> None:
        try:
            results[item] = group.submit(item)
        except BatchCommitError as exc:
            results[item] = exc

    threads = [threading.Thread(target=submit, args=("first",))]
    threads[0].start()
    wait_until(lambda: batches == [["first"]], 30, what="the committer to take the first batch")
    threads += [threading.Thread(target=submit, args=(item,)) for item in ("a", "bad", "b")]
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: group.waiting == 3, 30, what="three instances waiting")
    first_held.set()
    for thread in threads:
        thread.join(30)
    assert sorted(batches[1]) == ["a", "b", "bad"]  # one batch for all that waited
    assert results["first"] == "FIRST"
    for item in ("a", "bad", "b"):
        assert isinstance(results[item], BatchCommitError) and "index write failed" in str(results[item])
    assert group.submit("c") == "C"


def test_an_idle_committer_ends_and_closes_what_it_holds_and_the_next_submit_starts_another() -> None:
    closed: list[str] = []
    group: GroupCommit[str, str] = GroupCommit(
        lambda items: [i.upper() for i in items], "test-commit", on_idle=lambda: closed.append("closed"), idle_s=0.05)
    assert group.submit("a") == "A"
    wait_until(lambda: closed == ["closed"], 30, what="the idle committer to close its connection")
    assert group.submit("b") == "B"
    wait_until(lambda: closed == ["closed", "closed"], 30, what="the second committer to end")


def test_series_completes_after_quiet_period_or_expected_count(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    quiet_job, _, _ = accept(store, "1.2.3.4.1")
    counted_job, _, _ = accept(store, "1.2.3.5.1", header={"ImagesInAcquisition": 1}, series="1.2.3.5")
    assert store.complete_quiet(stable_after_s=3600) == [counted_job]
    now = store.index.job(quiet_job).last_instance_at
    assert store.complete_quiet(stable_after_s=10, now=now + 5) == []
    assert store.complete_quiet(stable_after_s=10, now=now + 11) == [quiet_job]


def test_transitions_outside_the_state_machine_are_refused(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id, _, _ = accept(store, "1.2.3.4.1")
    with pytest.raises(TransitionError):
        store.index.transition(job_id, JobState.DELIVERED)
    store.index.transition(job_id, JobState.COMPLETE)
    assert store.index.job(job_id).state is JobState.COMPLETE


def test_late_instance_opens_a_new_job_covering_the_whole_series(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    first, _, _ = accept(store, "1.2.3.4.1")
    store.index.transition(first, JobState.COMPLETE)
    second, _, late = accept(store, "1.2.3.4.2")
    assert late and second != first
    assert store.index.job(second).instances == 2
    assert store.index.job(first).late_instances == 1
    assert len(store.instance_files(store.index.job(second))) == 2


def test_retention_purges_old_finished_series_but_keeps_failed(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    done, _, _ = accept(store, "1.2.3.4.1")
    broken, _, _ = accept(store, "1.2.3.5.1", series="1.2.3.5")
    for job_id, state in ((done, JobState.UNROUTED), (broken, JobState.FAILED)):
        store.index.transition(job_id, JobState.COMPLETE)
        store.index.transition(job_id, state, reason="test")
    later = store.index.job(done).updated_at + 8 * 86400
    assert store.purge_expired(unrouted_days=7, finished_days=30, now=later - 2 * 86400) == 0
    assert store.purge_expired(unrouted_days=7, finished_days=30, now=later) == 1
    assert store.index.job(done).detail.purged is True
    assert not list((store.spool.root / "1.2.3" / "1.2.3.4").glob("*.dcm"))
    assert (store.spool.root / "1.2.3" / "1.2.3.5" / "1.2.3.5.1.dcm").exists()


def test_retention_keeps_a_delivered_case_until_it_is_synced(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id, _, _ = accept(store, "1.2.3.4.1")
    index = store.index
    index.transition(job_id, JobState.COMPLETE)
    index.transition(job_id, JobState.ROUTED, routes=[job_route(sync=True)])
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING, JobState.DELIVERED):
        index.transition(job_id, state)
    later = index.job(job_id).updated_at + 31 * 86400
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later) == 0
    index.update_detail(job_id, lambda d: replace(d, synced=SyncRecord(case="x", at="2026-12-02T00:00:00+00:00")))
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later) == 1


def routed(store: Store, sop: str, series: str) -> int:
    """A job that a rule routed: waiting for a worker's `infer` stage."""
    job_id, _, _ = accept(store, sop, series=series)
    store.index.transition(job_id, JobState.COMPLETE, completed_at=float(sop.rsplit(".", 1)[1]))
    store.index.transition(job_id, JobState.ROUTED, routes=[job_route()])
    return job_id


def test_two_workers_claiming_at_once_get_different_jobs_oldest_first(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    first, second = routed(store, "1.2.3.4.1", "1.2.3.4"), routed(store, "1.2.3.5.2", "1.2.3.5")
    other = Store(tmp_path, index_url)  # another worker process, its own connections
    a = store.index.claim([JobState.ROUTED], "a:1", lease_s=30)
    b = other.index.claim([JobState.ROUTED], "b:2", lease_s=30)
    assert (a and a.id, b and b.id) == (first, second)
    assert other.index.claim([JobState.ROUTED], "b:2", lease_s=30) is None
    held = store.index.job(first)
    assert held.claimed_by == "a:1" and held.lease_until is not None


def test_a_lapsed_lease_lets_another_worker_take_the_job_and_the_first_cannot_renew(
        tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    claimed = store.index.claim([JobState.ROUTED], "dead:1", lease_s=30)
    assert claimed is not None
    store.index.transition(job_id, JobState.INFERRING)
    assert store.index.claim([JobState.ROUTED, JobState.INFERRING], "b:2", lease_s=30) is None  # lease live
    later = store.index.job(job_id).lease_until + 1  # type: ignore[operator]
    taken = store.index.claim([JobState.ROUTED, JobState.INFERRING], "b:2", lease_s=30, now=later)
    assert taken is not None and taken.id == job_id and taken.state is JobState.INFERRING
    assert store.index.job(job_id).claimed_by == "b:2"
    assert not store.index.renew(job_id, "dead:1", lease_s=30)
    assert store.index.renew(job_id, "b:2", lease_s=30)
    store.index.release(job_id, "dead:1")  # not the holder: nothing changes
    assert store.index.job(job_id).claimed_by == "b:2"
    store.index.release(job_id, "b:2")
    assert store.index.job(job_id).claimed_by is None


def test_the_outbox_queues_a_sop_instance_once_and_leases_it_to_one_sender(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    outbox = Outbox(store.index)
    assert outbox.enqueue(job_id, "TPS", "job-1/rtstruct-0.dcm", "1.2.9.1", "1.2.840.10008.5.1.4.1.1.481.3")
    # a worker that took the job over writes the same file under the same UID again
    assert not outbox.enqueue(job_id, "TPS", "job-1/rtstruct-0.dcm", "1.2.9.1", "1.2.840.10008.5.1.4.1.1.481.3")
    assert outbox.due_destinations() == ["TPS"]
    [row] = outbox.claim_due("TPS", "a:1", lease_s=30)
    assert Outbox(Store(tmp_path, index_url).index).claim_due("TPS", "b:2", lease_s=30) == []
    assert outbox.due_destinations() == []  # leased: no other node starts a pass
    outbox.record(row, 0x0000, None, delivered=True)
    assert outbox.job_summary(job_id) == {OutboxState.DELIVERED: 1}
    assert [b.files for b in outbox.delivered_batches()] == [1]


def test_a_job_whose_rows_were_delivered_but_not_settled_is_settled_at_the_next_interval(
        tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING):
        store.index.transition(job_id, state)
    outbox = Outbox(store.index)
    outbox.enqueue(job_id, "TPS", "job-1/rtstruct-0.dcm", "1.2.9.1", "1.2.840.10008.5.1.4.1.1.481.3")
    [row] = outbox.claim_due("TPS", "a:1", lease_s=30)
    outbox.record(row, 0x0000, None, delivered=True)  # the pass's settle after this found the index away
    assert store.index.job(job_id).state is JobState.SENDING
    sender = Sender({}, DeliverySettings(), outbox, store.results)
    assert sender.deliver_due() == []  # the outbox's interval: nothing due to send
    sender.close()
    assert store.index.job(job_id).state is JobState.DELIVERED


def test_a_job_detail_round_trips_typed(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    review = Review(reasons=("Heart: 10 cc, expected 300-1200",), policy=ReviewPolicy.FLAG)
    store.index.update_detail(
        job_id,
        lambda d: replace(d, slice_files=("a.dcm", "b.dcm"), volumes_cc={"Heart": 10.0}, review=review,
                          outputs=(OutputKind.RTSTRUCT,), not_sent={"TPS": (OutputKind.SEG,)}),
    )
    detail = store.index.job(job_id).detail
    assert detail == JobDetail(slice_files=("a.dcm", "b.dcm"), volumes_cc={"Heart": 10.0}, review=review,
                               outputs=(OutputKind.RTSTRUCT,), not_sent={"TPS": (OutputKind.SEG,)})
    assert detail.shown() == {"slice_files": ["a.dcm", "b.dcm"], "volumes_cc": {"Heart": 10.0},
                              "review": {"reasons": ["Heart: 10 cc, expected 300-1200"], "policy": "flag",
                                         "released_by": None, "released_at": None},
                              "outputs": ["rtstruct"], "not_sent": {"TPS": ["seg"]}}
    [route] = store.index.job(job_id).routes
    assert route == job_route() and route.spec == "m@1"


def test_a_clinicians_set_is_linked_on_both_jobs_and_a_repeat_replaces_it(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    ct = routed(store, "1.2.3.4.1", "1.2.3.4")
    rt, _, _ = accept(store, "1.2.3.5.1", series="1.2.3.5")
    store.index.link_approved(ct, rt, "UNAPPROVED", 1)
    store.index.link_approved(ct, rt, "APPROVED", 1)
    assert store.index.job(ct).detail.approved == (ApprovedSet(job=rt, approval="APPROVED", instances=1),)
    assert store.index.job(ct).detail.approved_jobs() == [rt]
    rt_detail = store.index.job(rt).detail
    assert (rt_detail.linked_to, rt_detail.approval) == (ct, "APPROVED")


def test_agreement_figures_replace_a_cases_earlier_ones_and_filter(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    row = AgreementRow(ct_job=1, approval_job=2, model="m", model_version="1", structure="Heart", at=100.0,
                       tolerance_mm=2.0, dice=0.9, hd95_mm=3.5, msd_mm=None, surface_dice=0.8,
                       volume_ai_cc=600.0, volume_approved_cc=610.0, volume_diff_pct=1.7)
    store.index.replace_agreement(1, [row, replace(row, structure="Lung_L")])
    store.index.replace_agreement(1, [replace(row, dice=0.95, approval_job=3)])
    assert store.index.agreement() == [replace(row, dice=0.95, approval_job=3)]
    assert store.index.agreement(structure="HEART", since=50.0, model="m", version="1") != []
    assert store.index.agreement(model="other") == []


def test_a_scheduled_task_runs_on_one_node_at_a_time(tmp_path: Path, index_url: str) -> None:
    node_a, node_b = Store(tmp_path, index_url), Store(tmp_path, index_url)
    with node_a.index.singleton("retention") as a:
        with node_b.index.singleton("retention") as b:
            with node_b.index.singleton("sync-cases") as other_task:
                assert (a, b, other_task) == (True, False, True)
    with node_b.index.singleton("retention") as b_after:
        assert b_after


def test_start_up_on_an_index_of_its_own_reruns_a_job_caught_mid_inference(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    store.index.claim([JobState.ROUTED], "crashed:1", lease_s=30)
    store.index.transition(job_id, JobState.INFERRING)
    assert Store(tmp_path).recover()["rerun"] == 1
    job = store.index.job(job_id)
    assert (job.state, job.claimed_by) == (JobState.ROUTED, None)


def test_start_up_on_an_index_of_its_own_sends_at_once_what_a_crash_cut_off_mid_delivery(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    outbox = Outbox(store.index)
    outbox.enqueue(job_id, "TPS", "job-1/rtstruct-0.dcm", "1.2.9.1", "1.2.840.10008.5.1.4.1.1.481.3")
    [held] = outbox.claim_due("TPS", "crashed:1", lease_s=600)  # the pass the crash cut off
    assert outbox.due_destinations() == []
    Store(tmp_path).recover()
    assert outbox.due_destinations() == ["TPS"]
    [row] = outbox.claim_due("TPS", "restarted:2", lease_s=60)
    assert row.sop_uid == held.sop_uid


@pytest.mark.postgres
def test_start_up_on_a_shared_index_leaves_other_nodes_jobs_alone(tmp_path: Path, postgres_url: str) -> None:
    store = Store(tmp_path, postgres_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    store.index.claim([JobState.ROUTED], "busy:1", lease_s=30)
    store.index.transition(job_id, JobState.INFERRING)
    assert Store(tmp_path, postgres_url).recover()["rerun"] == 0
    job = store.index.job(job_id)
    assert (job.state, job.claimed_by) == (JobState.INFERRING, "busy:1")


# The index as the release before numbered migrations made it (a copy, frozen here).
UNVERSIONED_SCHEMA = """
CREATE TABLE series (id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL UNIQUE, study_uid TEXT NOT NULL,
    header TEXT NOT NULL, calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL, first_at REAL NOT NULL,
    last_at REAL NOT NULL);
CREATE TABLE jobs (id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL REFERENCES series(id), state TEXT NOT NULL,
    reason TEXT, instances INTEGER NOT NULL DEFAULT 0, late_instances INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, last_instance_at REAL NOT NULL, completed_at REAL,
    routes TEXT, model TEXT, model_version TEXT, detail TEXT);
CREATE INDEX jobs_state ON jobs(state, id);
CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, series_id INTEGER NOT NULL REFERENCES series(id),
    job_id INTEGER NOT NULL REFERENCES jobs(id), path TEXT NOT NULL, sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL,
    missing INTEGER NOT NULL DEFAULT 0);
CREATE INDEX instances_series ON instances(series_id);
CREATE TABLE transitions (job_id INTEGER NOT NULL REFERENCES jobs(id), at REAL NOT NULL, from_state TEXT,
    to_state TEXT NOT NULL, reason TEXT, who TEXT);
CREATE TABLE outbox (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL, path TEXT NOT NULL, sop_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
    created_at REAL NOT NULL, last_status INTEGER, last_error TEXT, UNIQUE (sop_uid, destination));
CREATE TABLE attempts (outbox_id INTEGER NOT NULL REFERENCES outbox(id), at REAL NOT NULL, status INTEGER,
    error TEXT);
INSERT INTO series VALUES (1, '1.2.3.4', '1.2.3', '{"Modality": "CT"}', 'PACS', 'IE_GATEWAY', 10, 11);
INSERT INTO jobs VALUES (1, 1, 'delivered', NULL, 2, 0, 10, 20, 11, 12,
    '[{"rule": "thorax", "model": "demo-thorax", "version": "2", "outputs": ["rtstruct", "seg"],
       "send_to": ["TPS"], "sync": true, "review": "hold"}]', 'demo-thorax', '2',
    '{"volumes_cc": {"Heart": 612.5}, "outputs": ["rtstruct", "seg"], "deliveries": 2, "qa_png": "/x/qa.png",
      "approved": [{"job": 2, "approval": "APPROVED", "instances": 1}], "a_key_no_longer_kept": 1}');
INSERT INTO transitions VALUES (1, 12, 'receiving', 'complete', NULL, NULL);
INSERT INTO transitions VALUES (1, 12, 'complete', 'routed', NULL, NULL);
INSERT INTO transitions VALUES (1, 20, 'sending', 'delivered', NULL, NULL);
"""


def test_an_index_from_before_numbered_migrations_upgrades_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.executescript(UNVERSIONED_SCHEMA)
    store = Store(tmp_path)
    job = store.index.job(1)
    assert job.state is JobState.DELIVERED and job.routes[0].outputs == (OutputKind.RTSTRUCT, OutputKind.SEG)
    assert (job.model, job.model_version, job.routes[0].sync) == ("demo-thorax", "2", True)
    assert job.detail.volumes_cc == {"Heart": 612.5} and job.detail.deliveries == 2
    assert job.detail.approved == (ApprovedSet(job=2, approval="APPROVED", instances=1),)
    assert [t.to_state for t in store.index.transitions(1)] == ["complete", "routed", "delivered"]
    versions = store.index.db.query("SELECT version FROM schema_version ORDER BY version")
    assert [v[0] for v in versions] == list(range(1, LATEST + 1))
    Store(tmp_path)  # opening it again applies nothing twice
    assert len(store.index.db.query("SELECT version FROM schema_version")) == LATEST


def test_a_stage_the_process_died_in_counts_as_a_crash_when_the_job_is_next_claimed(
        tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    index = store.index
    assert index.begin_stage(job_id, "infer") == StageAttempts(attempts=1, crashes=0)
    index.end_stage(job_id, "infer")  # ended: no crash
    assert index.begin_stage(job_id, "infer") == StageAttempts(attempts=2, crashes=0)
    # never ended: the node died in it
    reopened = Store(tmp_path, index_url).index
    assert reopened.begin_stage(job_id, "infer") == StageAttempts(attempts=3, crashes=1)
    reopened.end_stage(job_id, "infer", crashed=True)  # the inference process died under it
    assert reopened.stage_attempts(job_id) == {"infer": StageAttempts(attempts=3, crashes=2)}
    assert reopened.begin_stage(job_id, "write") == StageAttempts(attempts=1, crashes=0)


def test_a_deferred_job_is_claimed_by_nobody_until_its_retry_time(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    now = store.index.db.now()
    store.index.defer(job_id, now + 60, "infer: disk full (ENOSPC); retry 1 of 19 in 60 s")
    assert store.index.claim([JobState.ROUTED], "a:1", lease_s=30, now=now + 59) is None
    assert store.index.job(job_id).reason == "infer: disk full (ENOSPC); retry 1 of 19 in 60 s"
    claimed = store.index.claim([JobState.ROUTED], "a:1", lease_s=30, now=now + 61)
    assert claimed is not None and claimed.id == job_id


def test_retention_purges_an_excluded_case_without_waiting_for_its_sync(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    job_id, _, _ = accept(store, "1.2.3.4.1")
    index = store.index
    index.transition(job_id, JobState.COMPLETE)
    index.transition(job_id, JobState.ROUTED, routes=[job_route(sync=True)])
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING, JobState.DELIVERED):
        index.transition(job_id, state)
    index.transition(job_id, JobState.EXCLUDED, reason="sync: cannot be anonymised")
    later = index.job(job_id).updated_at + 31 * 86400
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later - 2 * 86400) == 0
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later) == 1


def test_start_up_counts_a_stage_the_node_died_in_as_a_crash_of_its_job(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    store.index.begin_stage(job_id, "infer")
    store.index.transition(job_id, JobState.INFERRING)  # then the node was killed
    summary = Store(tmp_path).recover()
    assert (summary["crashed"], summary["rerun"]) == (1, 1)
    assert store.index.stage_attempts(job_id) == {"infer": StageAttempts(attempts=1, crashes=1)}
    assert store.index.begin_stage(job_id, "infer") == StageAttempts(attempts=2, crashes=1)  # counted once


def test_a_reroute_starts_the_crash_count_afresh(tmp_path: Path, index_url: str) -> None:
    from ie_gateway.ops.admin import reroute

    store = Store(tmp_path, index_url)
    job_id = routed(store, "1.2.3.4.1", "1.2.3.4")
    store.index.begin_stage(job_id, "infer")
    store.index.end_stage(job_id, "infer", crashed=True)
    store.index.transition(job_id, JobState.FAILED, reason="crashed the node 2 times at infer")
    reroute(store, job_id, "admin")
    assert store.index.stage_attempts(job_id) == {}

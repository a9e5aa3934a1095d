"""The spool and index on their own: state machine, completion, late instances, retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from ie_gateway.errors import UnsafeUIDError
from ie_gateway.store import Arrival, JobState, Store, TransitionError, check_uid


def arrival(sop: str, series: str = "1.2.3.4", study: str = "1.2.3") -> Arrival:
    return Arrival(sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid=study, series_uid=series,
                   transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS", called_ae="IE_GATEWAY")


def accept(store: Store, sop: str, header: dict | None = None, **kw: str) -> tuple[int, bool, bool]:
    return store.accept(arrival(sop, **kw), (b"DICM-bytes-" + sop.encode(),), lambda: header or {"Modality": "CT"})


@pytest.mark.parametrize("bad", ["", "1.2.a", "../1", "1/2", "1." + "9" * 64, "1.2\\3"])
def test_unsafe_uids_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeUIDError):
        check_uid(bad, "SOPInstanceUID")


def test_accepted_instance_is_on_disk_and_indexed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id, duplicate, late = accept(store, "1.2.3.4.1")
    assert (duplicate, late) == (False, False)
    path = store.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert path.read_bytes() == b"DICM-bytes-1.2.3.4.1"
    job = store.index.job(job_id)
    assert (job.state, job.instances, job.header) == (JobState.RECEIVING, 1, {"Modality": "CT"})


def test_duplicate_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first, _, _ = accept(store, "1.2.3.4.1")
    _, duplicate, _ = store.accept(arrival("1.2.3.4.1"), (b"other bytes",), dict)
    assert duplicate
    assert store.index.job(first).instances == 1
    assert (store.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm").read_bytes() == b"DICM-bytes-1.2.3.4.1"


def test_failed_write_leaves_no_file_and_no_row(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def chunks():  # the sender's bytes stop half way with an I/O error
        yield b"half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.accept(arrival("1.2.3.4.9"), chunks(), dict)
    assert list(store.spool.iter_instances()) == []
    assert list(store.spool.tmp.iterdir()) == []
    assert not store.index.has_instance("1.2.3.4.9")


def test_series_completes_after_quiet_period_or_expected_count(tmp_path: Path) -> None:
    store = Store(tmp_path)
    quiet_job, _, _ = accept(store, "1.2.3.4.1")
    counted_job, _, _ = accept(store, "1.2.3.5.1", header={"ImagesInAcquisition": 1}, series="1.2.3.5")
    assert store.complete_quiet(stable_after_s=3600) == [counted_job]
    now = store.index.job(quiet_job).last_instance_at
    assert store.complete_quiet(stable_after_s=10, now=now + 5) == []
    assert store.complete_quiet(stable_after_s=10, now=now + 11) == [quiet_job]


def test_transitions_outside_the_state_machine_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id, _, _ = accept(store, "1.2.3.4.1")
    with pytest.raises(TransitionError):
        store.index.transition(job_id, JobState.DELIVERED)
    store.index.transition(job_id, JobState.COMPLETE)
    assert store.index.job(job_id).state is JobState.COMPLETE


def test_late_instance_opens_a_new_job_covering_the_whole_series(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first, _, _ = accept(store, "1.2.3.4.1")
    store.index.transition(first, JobState.COMPLETE)
    second, _, late = accept(store, "1.2.3.4.2")
    assert late and second != first
    assert store.index.job(second).instances == 2
    assert store.index.job(first).late_instances == 1
    assert len(store.instance_files(store.index.job(second))) == 2


def test_retention_purges_old_finished_series_but_keeps_failed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    done, _, _ = accept(store, "1.2.3.4.1")
    broken, _, _ = accept(store, "1.2.3.5.1", series="1.2.3.5")
    for job_id, state in ((done, JobState.UNROUTED), (broken, JobState.FAILED)):
        store.index.transition(job_id, JobState.COMPLETE)
        store.index.transition(job_id, state, reason="test")
    later = store.index.job(done).updated_at + 8 * 86400
    assert store.purge_expired(unrouted_days=7, finished_days=30, now=later - 2 * 86400) == 0
    assert store.purge_expired(unrouted_days=7, finished_days=30, now=later) == 1
    assert store.index.job(done).detail["purged"] is True
    assert not list((store.spool.root / "1.2.3" / "1.2.3.4").glob("*.dcm"))
    assert (store.spool.root / "1.2.3" / "1.2.3.5" / "1.2.3.5.1.dcm").exists()


def test_retention_keeps_a_delivered_case_until_it_is_synced(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job_id, _, _ = accept(store, "1.2.3.4.1")
    index = store.index
    index.transition(job_id, JobState.COMPLETE)
    index.transition(job_id, JobState.ROUTED, routes=[{"model": "m", "version": "1", "sync": True}])
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING, JobState.DELIVERED):
        index.transition(job_id, state)
    later = index.job(job_id).updated_at + 31 * 86400
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later) == 0
    index.update_detail(job_id, synced={"case": "x"})
    assert store.purge_expired(unrouted_days=7, finished_days=30, sync_enabled=True, now=later) == 1

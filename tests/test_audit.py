"""`ie-gateway audit`: the trail of a case from receipt to delivery and sync, with admin actions,
kept after retention purged the instance files."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import pytest

from ie_gateway.errors import BadDate
from ie_gateway.interop.retrieve import study_date
from ie_gateway.ops.audit import parse_since
from ie_gateway.store import Arrival, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import SyncRecord
from ie_gateway.store.states import JobState
from tests.jobs import job_route
from tests.peers import Node


def _case(store: Store, n: int, instances: int = 3) -> int:
    job_id = 0
    for i in range(instances):
        arrival = Arrival(sop_uid=f"1.2.3.{n}.{i}", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                          series_uid=f"1.2.3.{n}", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
                          called_ae="IE_GATEWAY")
        job_id, _, _ = store.accept(arrival, (b"x" * 100,), dict)
    return job_id


def test_audit_shows_received_routed_delivered_synced_and_admin_actions_after_a_purge(node_factory: object) -> None:
    node: Node = node_factory()  # type: ignore[operator]  # its config and storage; not started
    store = Store(node.root)
    job = _case(store, 1)
    store.index.transition(job, JobState.COMPLETE)
    store.index.transition(job, JobState.ROUTED, routes=[job_route("demo-thorax", "2", rule="thorax-ct")])
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING):
        store.index.transition(job, state)
    outbox = Outbox(store.index)
    outbox.enqueue(job, "TPS", f"job-{job}/rs.dcm", "1.2.3.9", "1.2.840.10008.5.1.4.1.1.481.3")
    [row] = outbox.claim_due("TPS", "test", 60)
    outbox.record(row, 0xA700, "TPS answered 0xA700", delivered=False, dead=True)
    store.index.transition(job, JobState.FAILED, reason="delivery: TPS answered 0xA700")
    outbox.retry(job)
    store.index.transition(job, JobState.SENDING, reason="replayed by alice")
    [row] = outbox.claim_due("TPS", "test", 60)
    outbox.record(row, 0x0000, None, delivered=True)
    store.index.transition(job, JobState.DELIVERED)
    record = SyncRecord(case="x", at="2099-01-01T00:00:00+00:00", ct=3, ai=1)
    store.index.update_detail(job, lambda d: replace(d, synced=record))
    other = _case(store, 2)
    assert store.purge_for_space(lambda: False) == 1  # instance files gone; the trail stays
    assert not store.instance_files(store.index.job(job))

    text = node.cli("audit").stdout
    lines = [line for line in text.splitlines() if f"job {job} " in line]
    events = [line.split()[3] for line in lines]
    assert events == ["received", "routed", "failed", "admin", "sent", "delivered", "synced"]
    assert "3 instances from PACS to IE_GATEWAY" in lines[0]
    assert "rule thorax-ct -> demo-thorax@2" in lines[1]
    assert "[alice]" in lines[3] and "replayed by alice" in lines[3]
    assert "1 files to TPS" in lines[4]
    assert any(f"job {other} " in line for line in text.splitlines())
    assert "1.2.3" not in text  # no UIDs

    only = node.cli("audit", "--job", str(other)).stdout
    assert only and all(f"job {other} " in line for line in only.splitlines())

    rows = list(csv.DictReader(io.StringIO(node.cli("audit", "--csv", "--job", str(job)).stdout)))
    assert [r["event"] for r in rows] == events
    assert rows[3]["who"] == "alice"

    future = node.cli("audit", "--since", "2098-12-31").stdout.splitlines()
    assert [line.split()[3] for line in future] == ["synced"]
    assert node.cli("audit", "--since", "1h").stdout == text  # everything happened within the hour (or later)
    bad = node.cli("audit", "--since", "yesterday", check=False)
    assert bad.returncode != 0 and "--since" in bad.stderr


def test_since_is_an_age_or_a_date_and_anything_else_is_a_bad_date() -> None:
    now = 1_000_000.0
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("1970-01-02", now) == 86400.0  # UTC unless it says
    with pytest.raises(BadDate, match="--since 'yesterday'"):
        parse_since("yesterday", now)


def test_a_fetch_date_becomes_a_dicom_date_and_a_bad_one_is_refused() -> None:
    assert study_date("2026-12-01") == "20261201"
    with pytest.raises(BadDate, match="not a date"):
        study_date("2026-13-01")

"""A reviewer's verdict on a held result (ie_gateway.ops.admin): release and reject take a comment,
kept in the job's history under the person's name and shown by `ie-gateway audit`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ie_gateway.errors import AdminError
from ie_gateway.ops import admin, audit
from ie_gateway.store import Arrival, Store
from ie_gateway.store.states import JobState
from tests.jobs import job_route
from tests.peers import Node


def held_job(store: Store) -> int:
    arrival = Arrival(
        sop_uid="1.2.3.4.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
    )
    job_id, _, _ = store.accept(arrival, (b"x" * 100,), dict)
    store.index.transition(job_id, JobState.COMPLETE)
    store.index.transition(job_id, JobState.ROUTED, routes=[job_route("demo-thorax", "3")])
    for state in (JobState.INFERRING, JobState.INFERRED):
        store.index.transition(job_id, state)
    store.index.transition(job_id, JobState.NEEDS_REVIEW, reason="needs review: Heart: 0% inside External")
    return job_id


def test_reject_ends_a_held_job_failed_with_who_and_why(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = held_job(store)
    admin.reject(store, job, "bob", "  Heart drawn in the\nair;\tnot usable  ")
    [moved] = [t for t in store.index.transitions(job) if t.who]
    assert (moved.to_state, moved.who, moved.reason) == (
        "failed",
        "bob",
        "rejected by bob: Heart drawn in the air; not usable",
    )
    with pytest.raises(AdminError, match="not needs_review"):
        admin.release(store, job, "bob", "too late")
    events = audit.audit_events(store, None, None, job)  # type: ignore[arg-type]  # no activations asked for
    [event] = [e for e in events if e.event == "admin"]
    assert event.who == "bob" and "Heart drawn" in event.detail


def test_a_comment_is_one_line_of_bounded_length(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = held_job(store)
    admin.release(store, job, "alice", "ok\n" * 400)
    [moved] = [t for t in store.index.transitions(job) if t.who]
    assert (
        moved.reason is not None and "\n" not in moved.reason and len(moved.reason) <= len("released by alice: ") + 500
    )


def test_the_command_line_rejects_with_a_comment(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")  # its configuration and storage; not started
    store = Store(node.root)
    job = held_job(store)
    out = node.cli("reject", str(job), "--comment", "External cut at the table").stdout
    assert f"job {job}: rejected" in out
    assert store.index.job(job).reason.endswith(": External cut at the table")
    assert node.cli("release", str(job), check=False).returncode == 1  # nothing held any more

"""The admin page's buttons that succeed: each action moves the job, and the audit trail says
which action it was and who pressed it (the page's requests, in process, with the admin token: an action by the
shared token is recorded as "token", a named account's under its name)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette
from starlette.testclient import TestClient

from ie_gateway.config import load_config
from ie_gateway.infer.registry import registry_for
from ie_gateway.ops.audit import audit_events
from ie_gateway.store import JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.vocab import OutboxState
from ie_gateway.web import web_routes

TOKEN = "web-actions-token-1f3a"
RT = "1.2.840.10008.5.1.4.1.1.481.3"


def _job(store: Store, n: int, *states: JobState) -> int:
    job, _ = store.index.add_instance(
        sop_uid=f"1.2.3.{n}.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2.3",
        series_uid=f"1.2.3.{n}",
        path=f"{n}.dcm",
        size=1,
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
        header=lambda: {"Modality": "CT"},
    )
    for state in states:
        store.index.transition(job, state)
    return job


@pytest.fixture
def site(tmp_path: Path) -> tuple[Store, TestClient]:
    (tmp_path / "models").mkdir()
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "gateway.yaml").write_text(
        yaml.safe_dump({"storage": {"root": "var"}, "models_dir": "models", "routing_file": "routing.yaml"})
    )
    cfg = load_config(tmp_path / "gateway.yaml")
    store = Store(cfg.storage.root)
    app = Starlette(routes=web_routes(cfg, store, registry_for(cfg), token=TOKEN))
    return store, TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


def _admin_events(store: Store, job: int) -> list[tuple[str, str]]:
    return [(e.detail, e.who) for e in audit_events(store, registry=None, job=job) if e.event == "admin"]  # type: ignore[arg-type]


def test_retry_replays_the_dead_letters_and_the_trail_names_who(site: tuple[Store, TestClient]) -> None:
    store, client = site
    job = _job(store, 1, JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING, JobState.INFERRED, JobState.SENDING)
    outbox = Outbox(store.index)
    outbox.enqueue(job, "TPS", f"job-{job}/rtstruct-0.dcm", "1.2.9.1", RT)
    [row] = outbox.claim_due("TPS", "test", 1.0, per_row_s=1.0)
    outbox.record(row, 0xA700, "out of resources", delivered=False, dead=True)
    outbox.settle(job)
    assert store.index.job(job).state is JobState.FAILED

    page = client.post(f"/jobs/{job}/retry")
    assert page.status_code == 200 and "retry done (1 deliveries queued)" in page.text
    assert store.index.job(job).state is JobState.SENDING
    assert outbox.job_summary(job) == {OutboxState.PENDING: 1}
    assert _admin_events(store, job) == [("failed -> sending: replayed by token", "token")]


def test_release_and_reroute_move_the_job_and_are_audited(site: tuple[Store, TestClient]) -> None:
    store, client = site
    held = _job(
        store, 2, JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING, JobState.INFERRED, JobState.NEEDS_REVIEW
    )
    unrouted = _job(store, 3, JobState.COMPLETE, JobState.UNROUTED)

    assert client.post(f"/jobs/{held}/release").status_code == 200
    assert store.index.job(held).state is JobState.INFERRED
    assert store.index.job(held).detail.review.released_by == "token"  # type: ignore[union-attr]
    assert client.post(f"/jobs/{unrouted}/reroute").status_code == 200
    assert store.index.job(unrouted).state is JobState.COMPLETE
    assert [who for _, who in _admin_events(store, held) + _admin_events(store, unrouted)] == ["token"] * 2

    refused = client.post(f"/jobs/{unrouted}/release")  # not held: nothing to release
    assert refused.status_code == 409 and store.index.job(unrouted).state is JobState.COMPLETE

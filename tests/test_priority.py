"""Today's patient first: the claim order by priority (rule and caller), aging so that low
priority work is never starved, and the queue as `status` and the admin page show it.

Store tests take ``index_url`` and run on SQLite and on PostgreSQL (the claim's ORDER BY must
behave the same on both).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette
from starlette.testclient import TestClient

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import ConfigError
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.pipeline import Worker
from ie_gateway.route import load_rules
from ie_gateway.route.load import model_exists
from ie_gateway.status import status_rows
from ie_gateway.store import Arrival, JobState, Store
from ie_gateway.store.states import QUEUED
from ie_gateway.vocab import Priority
from ie_gateway.web import web_routes
from tests.infer_packages import threshold_model, write_package
from tests.jobs import job_route
from tests.keys import DEMO_TRUSTED

CT = "1.2.840.10008.5.1.4.1.1.2"


def queued(store: Store, n: int, priority: Priority, completed_at: float, caller: str = "PACS") -> int:
    """A routed job of series ``n`` with ``priority``, its series completed at ``completed_at``."""
    arrival = Arrival(
        sop_uid=f"1.2.9.{n}.1",
        sop_class=CT,
        study_uid="1.2.9",
        series_uid=f"1.2.9.{n}",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae=caller,
        called_ae="IE_GATEWAY",
    )
    job_id, _, _ = store.accept(arrival, (b"DICM",), lambda: {"Modality": "CT"})
    store.index.transition(job_id, JobState.COMPLETE, completed_at=completed_at)
    store.index.transition(job_id, JobState.ROUTED, routes=[job_route()], priority=priority)
    return job_id


def claim_all(store: Store, now: float, max_wait_s: float) -> list[int]:
    claimed = []
    while job := store.index.claim([JobState.ROUTED], "w:1", lease_s=30, now=now, max_wait_s=max_wait_s):
        claimed.append(job.id)
    return claimed


def test_claims_take_high_then_normal_then_low_each_in_completion_order(tmp_path: Path, index_url: str) -> None:
    store = Store(tmp_path, index_url)
    now = time.time()
    low_old = queued(store, 1, Priority.LOW, now - 50)
    normal_late = queued(store, 2, Priority.NORMAL, now - 10)
    normal_early = queued(store, 3, Priority.NORMAL, now - 20)
    high = queued(store, 4, Priority.HIGH, now - 5)
    low_new = queued(store, 5, Priority.LOW, now - 1)
    expected = [high, normal_early, normal_late, low_old, low_new]
    assert [j.id for j in store.index.queue_order([JobState.ROUTED], now=now, max_wait_s=600)] == expected
    assert claim_all(store, now, max_wait_s=600) == expected
    assert store.index.job(low_old).priority is Priority.LOW


def test_a_low_job_waiting_longer_than_max_wait_is_taken_before_newer_urgent_ones(
    tmp_path: Path, index_url: str
) -> None:
    store = Store(tmp_path, index_url)
    now = time.time()
    commissioning = queued(store, 1, Priority.LOW, now - 700)
    today = [queued(store, 10 + i, Priority.HIGH, now - 60 + i) for i in range(3)]
    # within the limit, today's patients go first; past it the commissioning case is next
    assert [j.id for j in store.index.queue_order([JobState.ROUTED], now=now, max_wait_s=800)][-1] == commissioning
    assert claim_all(store, now, max_wait_s=600) == [commissioning, *today]


def test_a_stream_of_urgent_series_never_starves_a_low_one(tmp_path: Path, index_url: str) -> None:
    """One new high-priority series completes every 10 s and each takes 10 s to infer: the low
    job, queued first, is taken once it has waited max_wait_s, not never."""
    store = Store(tmp_path, index_url)
    start = time.time()
    low = queued(store, 0, Priority.LOW, start)
    taken_at = None
    for step in range(1, 20):
        now = start + 10 * step
        queued(store, step, Priority.HIGH, now)
        job = store.index.claim([JobState.ROUTED], "w:1", lease_s=5, now=now, max_wait_s=60)
        assert job is not None
        store.index.transition(job.id, JobState.INFERRING)
        if job.id == low:
            taken_at = now - start
            break
    assert taken_at is not None and 60 < taken_at <= 70


# --- the route stage sets the priority --------------------------------------------------------


RULES = {
    "rules": [
        {
            "name": "urgent",
            "match": {"Modality": "CT", "SeriesDescription": {"regex": "(?i)urgent"}},
            "model": "toy",
            "outputs": ["rtstruct"],
            "send_to": ["TPS"],
            "priority": "high",
        },
        {"name": "ct", "match": {"Modality": "CT"}, "model": "toy", "outputs": ["rtstruct"], "send_to": ["TPS"]},
    ]
}


def node_parts(tmp_path: Path) -> tuple[GatewayConfig, Store, Worker]:
    models = tmp_path / "models"
    write_package(models, [threshold_model(2)], name="toy", version="1", structures=1)
    routing = tmp_path / "routing.yaml"
    routing.write_text(yaml.safe_dump(RULES))
    cfg = GatewayConfig.model_validate(
        {
            "node": {"allowed_callers": [{"ae_title": "PACS"}, {"ae_title": "COMMISSION", "priority": "low"}]},
            "storage": {"root": str(tmp_path / "var")},
            "routing_file": str(routing),
            "models_dir": str(models),
            "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": 104}},
            "worker": {"max_wait_s": 600},
        }
    )
    store = Store.for_settings(cfg.storage)
    registry = Registry(models, tmp_path / "state.json", keys=DEMO_TRUSTED)
    rules = load_rules(routing, set(cfg.destinations), lambda n, v: model_exists(registry, n, v))
    # the inference child starts with the first job only: routing never starts it
    worker = Worker(cfg, store, registry, InferenceRunner(60), lambda: rules)
    return cfg, store, worker


def complete(store: Store, n: int, caller: str, description: str, at: float) -> int:
    arrival = Arrival(
        sop_uid=f"1.2.8.{n}.1",
        sop_class=CT,
        study_uid="1.2.8",
        series_uid=f"1.2.8.{n}",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae=caller,
        called_ae="IE_GATEWAY",
    )
    header = {"Modality": "CT", "SeriesDescription": description}
    job_id, _, _ = store.accept(arrival, (b"DICM",), lambda: header)
    store.index.transition(job_id, JobState.COMPLETE, completed_at=at)
    return job_id


def test_a_scanner_series_is_inferred_before_a_commissioning_run_queued_earlier(tmp_path: Path) -> None:
    _, store, worker = node_parts(tmp_path)
    now = time.time()
    commissioning = [complete(store, i, "COMMISSION", "thorax", now - 100 + i) for i in range(3)]
    urgent_from_commissioning = complete(store, 3, "COMMISSION", "urgent thorax", now - 90)
    scanner = complete(store, 4, "PACS", "thorax", now - 5)
    urgent = complete(store, 5, "PACS", "URGENT thorax", now - 1)
    while store.index.jobs([JobState.COMPLETE]):
        assert worker.run_once()  # the route stage: a claim of a complete job
    priorities = {j.id: j.priority for j in store.index.jobs()}
    assert priorities[urgent] is Priority.HIGH and priorities[scanner] is Priority.NORMAL
    # a rule cannot raise a job above its caller's priority
    assert priorities[urgent_from_commissioning] is Priority.LOW
    order = [store.index.claim([JobState.ROUTED], "w:1", lease_s=30, max_wait_s=600) for _ in range(6)]
    assert [j.id for j in order if j] == [urgent, scanner, *commissioning[:3], urgent_from_commissioning]


def test_status_and_the_page_show_the_queue_in_claim_order(tmp_path: Path) -> None:
    cfg, store, _ = node_parts(tmp_path)
    now = time.time()
    low = queued(store, 1, Priority.LOW, now - 30, caller="COMMISSION")
    normal = queued(store, 2, Priority.NORMAL, now - 10)
    rows = {r["id"]: r for r in status_rows(store, cfg.worker.max_wait_s)}
    assert (rows[normal]["queue"], rows[normal]["priority"]) == (1, "normal")
    assert (rows[low]["queue"], rows[low]["priority"]) == (2, "low")
    assert [j.id for j in store.index.queue_order(QUEUED)] == [normal, low]
    registry = Registry(cfg.models_dir, tmp_path / "state.json", keys=DEMO_TRUSTED)
    client = TestClient(Starlette(routes=web_routes(cfg, store, registry, token=None)))
    page = client.get("/jobs").text
    queue = page.split("<h2>Queue</h2>", 1)[1].split("</table>", 1)[0]
    assert queue.index(f'href="/jobs/{normal}"') < queue.index(f'href="/jobs/{low}"')
    assert ">low<" in queue and ">normal<" in queue


def test_an_unknown_priority_is_refused_with_its_line(tmp_path: Path) -> None:
    routing = tmp_path / "routing.yaml"
    rule = {**RULES["rules"][1], "priority": "urgent"}
    routing.write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_rules(routing, {"TPS"}, lambda n, v: True)
    assert "priority" in caught.value.errors[0] and "high" in caught.value.errors[0]

"""Webhooks (ie_gateway.ops.notify): each event reaches a real HTTP receiver started by the test,
carries no patient data, is retried with backoff, survives a restart, and never holds up the
node (a dead webhook delays neither the jobs nor another webhook)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from ie_gateway.config import GatewayConfig
from ie_gateway.ops.notify import Cursor, Notifier, hook_id
from ie_gateway.qa import agreement
from ie_gateway.qa.agreement import StructureFigures
from ie_gateway.store import Arrival, JobState, Store
from tests.jobs import job_route
from tests.peers import Orthanc, free_port, storescu, wait_until
from tests.test_pipeline import make_node

PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-4711", "PatientBirthDate": "19700101", "Modality": "CT"}
STUDY, SERIES = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.1.2"


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every body; answers 500 to the first ``fail``."""

    fail: int = 0
    bodies: list[bytes] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(b) for b in self.bodies]

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    failing = receiver.requests <= receiver.fail
                    if not failing:
                        receiver.bodies.append(body)
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def config(root: Path, hooks: list[dict[str, Any]]) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "storage": {"root": str(root)},
            "routing_file": str(root / "routing.yaml"),
            "models_dir": str(root),
            "http": {"public_url": "https://gateway.example/admin/"},
            "node": {"ae_title": "RT_GATEWAY"},
            "notify": hooks,
        }
    )


def hook(url: str, on: list[str], **kw: Any) -> dict[str, Any]:
    return {"url": url, "on": on, "backoff_s": 0.05, "timeout_s": 2, **kw}


def routed_job(store: Store, sop: str = "1") -> int:
    """A job with a patient's header, routed to model m@1."""
    arrival = Arrival(
        sop_uid=f"{SERIES}.{sop}",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        study_uid=STUDY,
        series_uid=SERIES,
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
    )
    job_id, _, _ = store.accept(arrival, (b"DICM",), lambda: dict(PATIENT))
    store.index.transition(job_id, JobState.COMPLETE)
    store.index.transition(job_id, JobState.ROUTED, routes=[job_route("m", "1", rule="thorax")])
    store.index.transition(job_id, JobState.INFERRING)
    store.index.transition(job_id, JobState.INFERRED)
    return job_id


def no_patient_data(raw: bytes) -> None:
    text = raw.decode()
    for value in ("DOE", "JANE", "PID-4711", "19700101", STUDY):
        assert value not in text, value


@pytest.fixture
def notifier_factory() -> Iterator[Any]:
    started: list[Notifier] = []

    def make(cfg: GatewayConfig, store: Store) -> Notifier:
        notifier = Notifier(cfg, store.index, every_s=0.05)
        notifier.start()
        started.append(notifier)
        return notifier

    yield make
    for notifier in started:
        notifier.stop()


def test_each_job_event_reaches_the_webhook_without_patient_data(
    tmp_path: Path, receiver: Receiver, notifier_factory: Any, index_url: str
) -> None:
    store = Store(tmp_path, index_url)
    cfg = config(tmp_path, [hook(receiver.url, ["needs_review", "failed", "delivered"])])
    notifier_factory(cfg, store)
    held, failing, delivered = routed_job(store, "1"), routed_job(store, "2"), routed_job(store, "3")
    store.index.transition(held, JobState.NEEDS_REVIEW, reason="needs review: Heart volume 2 cc below 300")
    store.index.transition(failing, JobState.FAILED, reason=f"instance {SERIES}.2 could not be read")
    store.index.transition(delivered, JobState.SENDING)
    store.index.transition(delivered, JobState.DELIVERED)
    events = wait_until(lambda: receiver.events() if len(receiver.events()) >= 3 else None, 60, what="3 events")
    assert [(e["event"], e["job"]) for e in events] == [
        ("needs_review", held),
        ("failed", failing),
        ("delivered", delivered),
    ]
    for event in events:
        assert (event["model"], event["model_version"], event["rules"]) == ("m", "1", ["thorax"])
        assert event["node"] == "RT_GATEWAY"
        assert event["link"] == f"https://gateway.example/admin/jobs/{event['job']}"
        assert event["state"] == event["event"]
    assert events[0]["reason"] == "needs review: Heart volume 2 cc below 300"
    assert events[1]["reason"].startswith("instance uid:")  # the UID hashed, as in the logs
    for raw in receiver.bodies:
        no_patient_data(raw)


def test_a_failing_webhook_is_retried_with_backoff_until_it_takes_the_event(
    tmp_path: Path, notifier_factory: Any
) -> None:
    flaky = Receiver(fail=2).start()
    try:
        store = Store(tmp_path)
        notifier_factory(config(tmp_path, [hook(flaky.url, ["failed"])]), store)
        job = routed_job(store)
        store.index.transition(job, JobState.FAILED, reason="inference ran past its time limit")
        [event] = wait_until(flaky.events, 60, what="the event after two refusals")
        assert (event["event"], event["job"], flaky.requests) == ("failed", job, 3)
    finally:
        flaky.stop()


def test_a_dead_webhook_delays_neither_the_node_nor_another_webhook(
    tmp_path: Path, receiver: Receiver, notifier_factory: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    store = Store(tmp_path)
    cfg = config(tmp_path, [hook(dead, ["failed"], max_attempts=3, backoff_s=0.3), hook(receiver.url, ["failed"])])
    notifier_factory(cfg, store)
    jobs = [routed_job(store, str(n)) for n in range(3)]
    for job in jobs:  # the node's own transitions never wait on a webhook
        store.index.transition(job, JobState.FAILED, reason="model error")
    told = wait_until(lambda: receiver.events() if len(receiver.events()) == 3 else None, 60, what="3 events")
    assert [e["job"] for e in told] == jobs
    # the dead webhook gives each event up after its attempts and moves on to the next
    cursor_file = tmp_path / "notify" / f"{hook_id(cfg.notify[0])}.json"
    last = store.index.last_transition_id()
    wait_until(lambda: Cursor.load(cursor_file, 0).last_transition == last, 30, what="the dead hook to give up")


def test_events_while_the_node_was_down_are_told_after_the_restart(
    tmp_path: Path, receiver: Receiver, notifier_factory: Any
) -> None:
    store = Store(tmp_path)
    cfg = config(tmp_path, [hook(receiver.url, ["delivered"])])
    notifier_factory(cfg, store).stop()  # the webhook's cursor now exists: from here on, all is told
    job = routed_job(store)
    store.index.transition(job, JobState.SENDING)
    store.index.transition(job, JobState.DELIVERED)
    assert receiver.events() == []
    notifier_factory(cfg, store)
    [event] = wait_until(receiver.events, 60, what="the missed event")
    assert (event["event"], event["job"]) == ("delivered", job)


def _figures(dice: float) -> list[StructureFigures]:
    return [StructureFigures("Heart", dice, 1.0, 0.5, 0.9, 100.0, 100.0 * dice)]


def test_a_drift_alarm_is_told_once(tmp_path: Path, receiver: Receiver) -> None:
    store = Store(tmp_path)
    cfg = config(tmp_path, [hook(receiver.url, ["drift"])])
    cfg = cfg.model_copy(update={"agreement": cfg.agreement.model_copy(update={"window": 3})})
    notifier = Notifier(cfg, store.index)
    notifier.start()  # makes the cursor: the threads are stopped at once, passes run here
    notifier.stop()
    for case, dice in enumerate([0.95, 0.96, 0.94, 0.70, 0.72, 0.71], start=1):
        agreement.record(store.index, case, 100 + case, {("demo", "2"): _figures(dice)}, 2.0, at=case)
    routed_job(store)  # the approvals came in as jobs: the index moved on
    assert notifier.tell_pending(cfg.notify[0]) == 1
    routed_job(store, "2")
    assert notifier.tell_pending(cfg.notify[0]) == 0  # still in alarm: not told again
    [event] = receiver.events()
    assert (event["event"], event["model"], event["model_version"], event["structure"]) == (
        "drift",
        "demo",
        "2",
        "Heart",
    )
    assert event["link"] == "https://gateway.example/admin/agreement"
    assert "DRIFT" in event["reason"]


@pytest.mark.peer
@pytest.mark.slow
def test_the_node_tells_its_webhook_a_job_was_delivered(
    node_factory: Any, orthanc: Orthanc, small_series: list[Path], tmp_path: Path, receiver: Receiver
) -> None:
    node = make_node(node_factory, tmp_path, orthanc.dicom_port)
    settings = yaml.safe_load(node.config.read_text())
    node.config.write_text(yaml.safe_dump({**settings, "notify": [{"url": receiver.url, "on": ["delivered"]}]}))
    node.start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    [event] = wait_until(receiver.events, 30, what="the delivered event")
    assert (event["event"], event["job"], event["model"]) == ("delivered", job["id"], "toy-body")
    ct = pydicom.dcmread(small_series[0], stop_before_pixels=True)
    [raw] = receiver.bodies
    for value in (str(ct.PatientName), ct.PatientID, ct.StudyInstanceUID, ct.SeriesInstanceUID):
        assert value not in raw.decode(), value

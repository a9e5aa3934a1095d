"""The HTTP endpoint monitoring polls: /healthz, /readyz, /metrics (checked by promtool)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ie_gateway.config import HttpSettings, Reserve
from ie_gateway.ops.health import Health
from ie_gateway.ops.httpserver import HttpServer, build_app
from ie_gateway.store import Arrival, Store
from ie_gateway.store.space import disk_space
from ie_gateway.store.states import JobState
from tests.peers import Node, echoscu, storescu, wait_until


def promtool_check(text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30, check=False)


def sample(text: str, name: str) -> float:
    """The value of one series line (``name`` includes its labels) in exposition text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.peer
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_health_ready_and_metrics_of_a_running_node(node: Node, small_series: list[Path]) -> None:
    assert node.http_get("/healthz") == (200, b"ok\n")
    status, body = node.http_get("/readyz")
    assert status == 200
    checks = json.loads(body)["checks"]
    assert set(checks) == {"listener", "index", "disk", "worker", "inference", "scheduler", "inference_device"}
    assert checks["inference_device"]["detail"].split(";")[0] in ("cpu", "cuda")

    socket.create_connection(("127.0.0.1", node.port)).close()  # a load balancer's probe
    assert storescu(node.port, small_series).returncode == 0
    node.wait_state({"unrouted"})

    status, body = node.http_get("/metrics")
    assert status == 200
    checked = promtool_check(body)
    assert checked.returncode == 0, checked.stderr.decode() + checked.stdout.decode()
    text = body.decode()
    assert sample(text, "ie_gateway_instances_received_total") == len(small_series)
    assert sample(text, 'ie_gateway_cstore_responses_total{status="0x0000"}') == len(small_series)
    stored = sum(p.stat().st_size for p in (node.root / "spool").rglob("*.dcm"))
    assert sample(text, "ie_gateway_received_bytes_total") == stored
    assert sample(text, 'ie_gateway_jobs{state="unrouted"}') == 1
    wait_until(lambda: sample(node.http_get("/metrics")[1].decode(),
                              'ie_gateway_connections_refused_total{reason="probe"}') >= 1, 60,
               what="the probe to be counted")
    for name in ("ie_gateway_associations_open", "ie_gateway_outbox_pending", "ie_gateway_dead_letters",
                 "ie_gateway_delivery_attempts_total", "ie_gateway_disk_free_bytes",
                 'ie_gateway_inference_device_info{device="cpu"}',
                 'ie_gateway_stage_seconds_count{stage="route"}'):
        sample(text, name)


@pytest.mark.peer
def test_below_the_disk_reserve_readyz_fails_and_associations_are_refused_as_transient(
        node_factory: object) -> None:
    node: Node = node_factory(settings={"storage": {"root": "var", "reserve": {"percent": 99.99}}})  # type: ignore[operator]
    node.start(echo=False)
    status, body = node.http_get("/readyz")
    assert status == 503
    assert not json.loads(body)["checks"]["disk"]["ok"]
    result = echoscu(node.port)
    assert result.returncode != 0
    assert "Local Limit Exceeded" in result.stderr or "local-limit-exceeded" in result.stderr.lower(), result.stderr
    assert any(e["event"] == "association refused" and e["reason"] == "free space below storage.reserve"
               for e in node.log_events())


def _health(store: Store, tmp_path: Path, last_tick: float, timeout_s: float = 900) -> Health:
    return Health(store, listening=lambda: True, worker_alive=lambda: True, worker_last_tick=lambda: last_tick,
                  scheduler_running=lambda: True, space=lambda: disk_space(tmp_path, Reserve(percent=0, gb=0)),
                  inference_timeout_s=timeout_s)


def test_a_worker_loop_that_stopped_ticking_fails_readiness_and_the_watchdog(tmp_path: Path) -> None:
    store = Store(tmp_path / "var")
    assert _health(store, tmp_path, last_tick=time.monotonic()).watchdog_ok()
    stuck = _health(store, tmp_path, last_tick=time.monotonic() - 2000, timeout_s=900)
    [worker] = [c for c in stuck.checks() if c.name == "worker"]
    assert not worker.ok and "not ticked" in worker.detail
    assert not stuck.ready() and not stuck.watchdog_ok()


def test_a_job_inferring_past_its_time_limit_fails_readiness_and_the_watchdog(tmp_path: Path) -> None:
    store = Store(tmp_path / "var")
    arrival = Arrival(sop_uid="1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                      series_uid="1.2.3.1", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
                      called_ae="IE_GATEWAY")
    job_id, _, _ = store.accept(arrival, (b"x" * 10,), dict)
    for state in (JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING):
        store.index.transition(job_id, state)
    health = _health(store, tmp_path, last_tick=time.monotonic(), timeout_s=10)
    assert health.ready()  # just started inferring
    with store.index.db.tx() as db:  # as if it had entered the state 71 s ago: limit 10 s + margin 60 s
        db.execute("UPDATE transitions SET at = at - 71 WHERE job_id = ? AND to_state = 'inferring'", (job_id,))
    [inference] = [c for c in health.checks() if c.name == "inference"]
    assert not inference.ok and f"job {job_id}" in inference.detail
    assert not health.watchdog_ok()


def test_extra_routes_are_served_beside_health_and_metrics(tmp_path: Path) -> None:
    store = Store(tmp_path / "var")
    page = Route("/admin", lambda _request: PlainTextResponse("admin page"))
    server = HttpServer(HttpSettings(port=0), build_app(_health(store, tmp_path, time.monotonic()), [page]))
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/admin", timeout=10) as rsp:
            assert rsp.read() == b"admin page"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as rsp:
            assert rsp.status == 200
    finally:
        server.stop()


@pytest.mark.peer
def test_an_http_port_in_use_stops_the_node_with_a_reason(node_factory: object) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node: Node = node_factory(settings={"http": {"bind": "127.0.0.1", "port": taken.getsockname()[1]}})  # type: ignore[operator]
        with pytest.raises(RuntimeError, match="node exited"):
            node.start()
    assert "HTTP endpoint could not listen" in node.log_text()

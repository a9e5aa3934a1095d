"""node.listener_processes: several processes accept associations on one shared listening socket.

Real peers: dcmtk's echoscu and storescu against `ie-gateway serve`. Each process's log lines
carry its name (``main``, ``listener-N``), which is how the tests see who took an association.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from ie_gateway.config import Caller, load_config
from ie_gateway.config import Node as NodeSettings
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.listeners import child_environment
from ie_gateway.receive import VERIFICATION, Receiver, listen_sockets
from ie_gateway.store import Store
from tests.peers import DCMTK_ENV, Node, echoscu, free_port, have, wait_until
from tests.test_http import sample
from tests.test_service import running

pytestmark = [pytest.mark.peer, pytest.mark.skipif(not have("storescu"), reason="dcmtk not installed")]

PROCESSES = 3


def _opened_by(node: Node) -> set[tuple[str, int]]:
    """(process name, pid) of every process that logged an accepted association."""
    return {(e["process"], e["pid"]) for e in node.log_events() if e["event"] == "association opened"}


def _children(node: Node) -> dict[str, int]:
    """The listener processes the main process started last, by name."""
    started = [e for e in node.log_events() if e["event"] == "listener process started"]
    return {f"listener-{e['listener']}": e["listener_pid"] for e in started}


def _echo_until_taken_by(node: Node, wanted: set[str]) -> None:
    """C-ECHO until every process in ``wanted`` has accepted one (idle processes race for each
    new connection: any of them may take it)."""

    def taken() -> bool:
        assert echoscu(node.port).returncode == 0
        return wanted <= {name for name, _ in _opened_by(node)}

    wait_until(taken, 120, every=0, what=f"associations accepted by {sorted(wanted)}")


@pytest.fixture
def node(node_factory: Any) -> Node:
    started: Node = node_factory(settings={"node": {"listener_processes": PROCESSES}}).start()
    return started


def test_every_listener_process_accepts_and_stores_durably(node: Node, tmp_path: Path) -> None:
    _echo_until_taken_by(node, {"main", *(f"listener-{n}" for n in range(1, PROCESSES))})
    folders = []
    for seed in range(4):
        folder = tmp_path / f"series{seed}"
        write_ct_series(make_phantom(60 + seed, slices=10, size=64, pixel_mm=7.8, slice_mm=5.0), folder, seed=60 + seed)
        folders.append(folder)
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", "STORESCU", "-aec", "IE_GATEWAY", "-R", "+sd", "+r", "127.0.0.1", str(node.port), str(f)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for f in folders
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=300)
        assert sender.returncode == 0, err
    rows = node.wait_state({"complete", "unrouted"}, count=4)
    assert sorted(r["instances"] for r in rows) == [10, 10, 10, 10]
    stored = list((node.root / "spool").rglob("*.dcm"))
    assert len(stored) == 40

    # /metrics, served by the main process, counts what every process received
    status, body = node.http_get("/metrics")
    assert status == 200
    text = body.decode()
    assert sample(text, "ie_gateway_instances_received_total") == 40
    assert sample(text, "ie_gateway_received_bytes_total") == sum(p.stat().st_size for p in stored)
    assert sample(text, 'ie_gateway_cstore_responses_total{status="0x0000"}') == 40
    accepted = sum(1 for e in node.log_events() if e["event"] == "association opened")
    assert sample(text, 'ie_gateway_associations_accepted_total{tls="no"}') == accepted
    assert sample(text, "ie_gateway_associations_open") == 0


def test_a_listener_process_that_dies_is_restarted(node: Node) -> None:
    before = _children(node)
    os.kill(before["listener-1"], signal.SIGKILL)

    def restarted() -> int | None:
        assert node.proc is not None and node.proc.poll() is None, node.log_text()[-3000:]
        pid = _children(node)["listener-1"]
        return pid if pid != before["listener-1"] else None

    new_pid = wait_until(restarted, 60, every=0.2, what="listener-1 started again")
    assert any(e["event"] == "listener process exited; restarting it" and e["exit_status"] == -signal.SIGKILL
               for e in node.log_events())

    def taken_by_new() -> bool:
        assert echoscu(node.port).returncode == 0
        return ("listener-1", new_pid) in _opened_by(node)

    wait_until(taken_by_new, 120, every=0, what="an association accepted by the restarted listener")
    assert _children(node)["listener-2"] == before["listener-2"]


def test_listener_processes_end_when_the_node_is_killed(node: Node) -> None:
    children = list(_children(node).values())
    assert len(children) == PROCESSES - 1 and all(running(pid) for pid in children)
    node.kill9()
    wait_until(lambda: not any(running(pid) for pid in children), 30, every=0.1, what="the listeners to end")


def test_listener_processes_stop_cleanly_with_the_node(node: Node) -> None:
    children = set(_children(node).values())
    node.stop()
    stopped = {e["listener_pid"]: e["exit_status"] for e in node.log_events() if e["event"] == "listener process stopped"}
    assert stopped == dict.fromkeys(children, 0)
    assert "Fatal Python error" not in node.log_text()


def test_a_listener_keeps_no_secret_it_does_not_need(node: Node) -> None:
    cfg = load_config(node.config)
    environ = {"PATH": "/usr/bin", "AZURE_STORAGE_KEY": "k", "IE_GATEWAY_WEBHOOK_TOKEN": "t", "PGPASSWORD": "p",
               "NOTIFY_SOCKET": "/run/systemd/notify", "CREDENTIALS_DIRECTORY": "/run/credentials/x"}
    assert child_environment(cfg, environ) == {"PATH": "/usr/bin"}  # SQLite index, no TLS


def test_a_new_connection_goes_to_the_listener_serving_fewer_associations(tmp_path: Path) -> None:
    """Two receivers accept from one shared socket, as the node's listener processes do: each
    association held open goes to the one that serves fewer (a kernel spreading them by hash, as
    SO_REUSEPORT did, ends two and two only three times in eight)."""
    settings = NodeSettings(bind="127.0.0.1", port=free_port(), allowed_callers=[Caller(ae_title="SCU")])
    store = Store(tmp_path / "spool")
    shared = listen_sockets(settings)
    receivers = [Receiver(settings, store), Receiver(settings, store)]
    for receiver in receivers:
        receiver.start(shared)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(VERIFICATION)
    held = []
    try:
        for count in range(1, 5):
            assoc = scu.associate("127.0.0.1", settings.port, ae_title="IE_GATEWAY")
            assert assoc.is_established
            held.append(assoc)
            wait_until(lambda: sum(r.open_associations() for r in receivers) == count, 10, every=0.01,
                       what=f"{count} associations open")
            assert sorted(r.open_associations() for r in receivers) == [count // 2, count - count // 2]
    finally:
        for assoc in held:
            assoc.release()
        for receiver in receivers:
            receiver.stop()
        store.index.close()


def test_the_port_stays_open_when_a_listener_process_stops(node: Node) -> None:
    """A child that stops closes only its own descriptor of the shared socket: a shutdown() of
    it would end listening for every process."""
    before = _children(node)
    os.kill(before["listener-1"], signal.SIGTERM)
    wait_until(lambda: any(e["event"] == "listener process exited; restarting it" for e in node.log_events()), 60,
               every=0.1, what="listener-1 to stop")
    for _ in range(10):
        assert echoscu(node.port).returncode == 0

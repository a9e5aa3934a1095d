"""Probes, scanners and silent connections cannot lock senders out of the node."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ie_gateway import reactor
from tests.peers import REPO, Node, echoscu, storescu, wait_until

pytestmark = pytest.mark.peer


def probes(port: int, cycles: int, seconds: float, silent: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.probes", str(port), str(cycles), str(seconds),
                             str(silent)], cwd=REPO, stdout=subprocess.PIPE, text=True)


def indexed_instances(node: Node) -> int:
    import sqlite3

    with sqlite3.connect(node.root / "index.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


@pytest.mark.slow
def test_1000_probes_and_20_silent_connections_leave_echo_and_store_working(
        node_factory: object, small_series: list[Path]) -> None:
    # Two slots only: before the fix, two silent connections locked every sender out.
    node: Node = node_factory(settings={"node": {"max_associations": 2, "acse_timeout_s": 3}}).start()  # type: ignore[operator]
    flood = probes(node.port, cycles=1000, seconds=10, silent=20)
    echoes = []
    sent = None
    while flood.poll() is None:
        echoes.append(echoscu(node.port).returncode)
        if sent is None:
            sent = storescu(node.port, small_series)
    out, _ = flood.communicate(timeout=60)
    report = json.loads(out)
    assert report["cycles"] == 1000
    assert report["silent_dropped_by_node"] == 20  # each dropped after acse_timeout_s
    assert len(echoes) >= 5 and set(echoes) == {0}
    assert sent is not None and sent.returncode == 0, sent.stderr
    assert indexed_instances(node) == len(small_series)


def test_silent_connection_is_closed_after_the_acse_timeout(node_factory: object) -> None:
    node: Node = node_factory(settings={"node": {"acse_timeout_s": 1}}).start()  # type: ignore[operator]
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(20)  # far beyond 1 s; pynetdicom's own timeout (60 s) would overrun it
        assert sock.recv(1) == b""


def test_silent_connections_hold_no_association_slot(node_factory: object) -> None:
    node: Node = node_factory(settings={"node": {"max_associations": 1, "acse_timeout_s": 30}}).start()  # type: ignore[operator]
    held = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(5)]
    try:
        assert echoscu(node.port).returncode == 0
    finally:
        for sock in held:
            sock.close()


def test_an_association_beyond_max_associations_is_refused_as_transient(node_factory: object) -> None:
    node: Node = node_factory(settings={"node": {"max_associations": 1}}).start()  # type: ignore[operator]
    ae = AE("ECHOSCU")
    ae.add_requested_context(Verification)
    first = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
    try:
        assert first.is_established
        second = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
    finally:
        first.release()
    # the slot is free again once the first association is released
    assert wait_until(lambda: echoscu(node.port).returncode == 0, 60, what="the slot to free")
    assert any(e["event"] == "association refused" and e["reason"] == "max_associations reached"
               for e in node.log_events())


def test_a_sender_that_releases_and_associates_again_at_once_is_not_refused(node_factory: object) -> None:
    """A released association's thread lives on while its DUL stops; it must not hold the slot."""
    node: Node = node_factory(settings={"node": {"max_associations": 1}}).start()  # type: ignore[operator]
    ae = AE("ECHOSCU")
    ae.add_requested_context(Verification)
    for _ in range(20):
        assoc = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
        assert assoc.is_established
        assoc.release()


@pytest.mark.slow
def test_an_established_association_idle_past_network_timeout_is_aborted_and_frees_its_slot(
        node_factory: object) -> None:
    node: Node = node_factory(settings={"node": {"max_associations": 1, "network_timeout_s": 2}}).start()  # type: ignore[operator]
    ae = AE("ECHOSCU")
    ae.network_timeout = 60  # the SCU would wait far longer: the node must be the one to end it
    ae.add_requested_context(Verification)
    idle = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
    assert idle.is_established
    assert echoscu(node.port).returncode != 0  # the one slot is taken while it is open
    wait_until(lambda: not idle.is_alive(), 20, what="the node to abort the idle association")
    assert idle.is_aborted or not idle.is_established
    assert wait_until(lambda: echoscu(node.port).returncode == 0, 60, what="the slot to free")

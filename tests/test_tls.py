"""DICOM TLS (PS3.15 Annex B) with dcmtk's own TLS tools on both sides, certificates by openssl."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from ie_gateway.config import DeliverySettings, Destination, DestinationTLS
from ie_gateway.send import Sender
from ie_gateway.store import Arrival, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.states import JobState
from ie_gateway.vocab import OutboxState
from tests.certs import Pair, expired_copy, issue, make_ca
from tests.peers import DCMTK_ENV, Node, free_port, port_open, wait_until

pytestmark = pytest.mark.peer

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    stranger_ca = make_ca(folder, "stranger-ca")
    return {"ca": ca, "node": issue(ca, folder, "node"), "pacs": issue(ca, folder, "pacs"),
            "tps": issue(ca, folder, "tps"), "stranger": issue(stranger_ca, folder, "stranger")}


def tls_node(node_factory: object, pki: dict[str, Pair], callers: list[dict[str, object]] | None = None,
             **node_settings: object) -> Node:
    tls_port = free_port()
    node: Node = node_factory(settings={"node": {  # type: ignore[operator]
        "tls": {"port": tls_port, "cert": str(pki["node"].cert), "key": str(pki["node"].key),
                "ca": str(pki["ca"].cert), "require_client_cert": True},
        **({"allowed_callers": callers} if callers else {}), **node_settings}})
    node.tls_port = tls_port  # type: ignore[attr-defined]
    return node.start(echo=not callers)  # plain echoscu cannot prove readiness where TLS is required


def dcmtk_tls(tool: str, port: int, client: Pair | None, ca: Pair, *args: str, calling: str = "ECHOSCU",
              files: Sequence[Path] = ()) -> subprocess.CompletedProcess[str]:
    creds = ["+tls", str(client.key), str(client.cert)] if client else ["+tla"]
    return subprocess.run([f"/usr/bin/{tool}", *creds, "+cf", str(ca.cert), "-aet", calling, "-aec", "IE_GATEWAY",
                           *args, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=120, check=False)


def test_echo_over_tls_with_a_client_certificate_signed_by_the_ca(node_factory: object, pki: dict[str, Pair]) -> None:
    node = tls_node(node_factory, pki)
    result = dcmtk_tls("echoscu", node.tls_port, pki["pacs"], pki["ca"])  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert any(e["event"] == "association opened" and e["tls"] for e in node.log_events())


def test_every_listener_process_answers_on_the_tls_port(node_factory: object, pki: dict[str, Pair]) -> None:
    """The TLS port's listening socket is shared with the listener processes too (the second
    socket each child inherits): echoes over TLS until every process has taken one."""
    node = tls_node(node_factory, pki, listener_processes=3)

    def every_process_answered() -> bool:
        result = dcmtk_tls("echoscu", node.tls_port, pki["pacs"], pki["ca"])  # type: ignore[attr-defined]
        assert result.returncode == 0, result.stderr
        took = {e["process"] for e in node.log_events() if e["event"] == "association opened" and e["tls"]}
        return took == {"main", "listener-1", "listener-2"}

    wait_until(every_process_answered, 120, every=0, what="a TLS association in every listener process")


@pytest.mark.parametrize("client", ["stranger", None], ids=["certificate-from-another-ca", "no-certificate"])
def test_a_caller_without_a_valid_client_certificate_is_refused(node_factory: object, pki: dict[str, Pair],
                                                                client: str | None) -> None:
    node = tls_node(node_factory, pki)
    result = dcmtk_tls("echoscu", node.tls_port, pki[client] if client else None, pki["ca"])  # type: ignore[attr-defined]
    assert result.returncode != 0
    assert wait_until(lambda: any(e["event"] == "connection refused" and e["reason"] == "TLS handshake failed"
                                  for e in node.log_events()), 60, what="the refusal in the log")
    assert echoscu_plain_ok(node)  # the node serves on


def echoscu_plain_ok(node: Node) -> bool:
    from tests.peers import echoscu

    return echoscu(node.port).returncode == 0


def test_storescu_over_tls_lands_the_series(node_factory: object, pki: dict[str, Pair],
                                            small_series: list[Path]) -> None:
    node = tls_node(node_factory, pki)
    result = dcmtk_tls("storescu", node.tls_port, pki["pacs"], pki["ca"], "-R",  # type: ignore[attr-defined]
                       calling="STORESCU", files=small_series)
    assert result.returncode == 0, result.stderr
    [row] = node.wait_state({"unrouted"})
    assert row["instances"] == len(small_series)


def test_a_caller_that_requires_tls_is_refused_on_the_plain_port(node_factory: object, pki: dict[str, Pair]) -> None:
    node = tls_node(node_factory, pki, callers=[{"ae_title": "ECHOSCU", "require_tls": True}])
    plain = subprocess.run(["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "IE_GATEWAY", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, env=DCMTK_ENV, timeout=60, check=False)
    assert plain.returncode != 0
    assert any(e["event"] == "association refused" and e["reason"] == "caller must use the TLS port"
               for e in node.log_events())
    assert dcmtk_tls("echoscu", node.tls_port, pki["pacs"], pki["ca"]).returncode == 0  # type: ignore[attr-defined]


class TlsStoreSCP:
    """dcmtk storescp +tls standing in for a TPS that requires our client certificate."""

    def __init__(self, folder: Path, pki: dict[str, Pair]) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "+tls", str(pki["tps"].key), str(pki["tps"].cert), "+cf", str(pki["ca"].cert),
             "-aet", "TPS", "-od", str(folder), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
        wait_until(lambda: port_open(self.port), 30, what="storescp +tls")

    def received(self) -> Sequence[Path]:
        return sorted(self.folder.glob("*"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def test_results_are_sent_over_tls_to_a_destination_that_requires_it(
        tmp_path: Path, pki: dict[str, Pair], small_series: list[Path]) -> None:
    tps = TlsStoreSCP(tmp_path / "tps", pki)
    try:
        store = Store(tmp_path / "var")
        arrival = Arrival(sop_uid="1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                          series_uid="1.2.3.1", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
                          called_ae="IE_GATEWAY")
        job_id, _, _ = store.accept(arrival, (b"x",), dict)
        for state in (JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING, JobState.INFERRED, JobState.SENDING):
            store.index.transition(job_id, state)
        result = store.results / f"job-{job_id}" / "result.dcm"
        result.parent.mkdir(parents=True)
        shutil.copy(small_series[0], result)
        import pydicom

        ds = pydicom.dcmread(result, stop_before_pixels=True)
        outbox = Outbox(store.index)
        outbox.enqueue(job_id, "TPS", str(result.relative_to(store.results)), ds.SOPInstanceUID, ds.SOPClassUID)
        dest = Destination(ae_title="TPS", host="127.0.0.1", port=tps.port,
                           tls=DestinationTLS(ca=str(pki["ca"].cert), cert=str(pki["node"].cert),
                                              key=str(pki["node"].key)))
        sender = Sender({"TPS": dest}, DeliverySettings(), outbox, store.results)
        [delivery] = sender.deliver_due()
        assert delivery.result(timeout=60) == 1
        assert len(tps.received()) == 1

        # without our client certificate the TPS refuses the handshake: deferred, not lost
        outbox.enqueue(job_id, "TPS2", str(result.relative_to(store.results)), ds.SOPInstanceUID, ds.SOPClassUID)
        anonymous = Destination(ae_title="TPS", host="127.0.0.1", port=tps.port,
                                tls=DestinationTLS(ca=str(pki["ca"].cert)))
        [refused] = Sender({"TPS2": anonymous}, DeliverySettings(), outbox, store.results).deliver_due()
        assert refused.result(timeout=60) == 0
        assert outbox.job_summary(job_id) == {OutboxState.DELIVERED: 1, OutboxState.PENDING: 1}
    finally:
        tps.stop()


@pytest.mark.parametrize(("host", "ca", "check_hostname", "delivered"), [
    ("127.0.0.1", "stranger", True, 0),  # a TPS certificate our CA did not sign
    ("127.0.0.2", "ca", True, 0),  # a certificate for another host name (it names 127.0.0.1 and localhost)
    ("127.0.0.2", "ca", False, 1),  # the same peer, the host name check turned off: reachable, so the check refused
])
def test_a_tls_destination_that_cannot_prove_who_it_is_gets_nothing(
        tmp_path: Path, pki: dict[str, Pair], small_series: list[Path], host: str, ca: str, check_hostname: bool,
        delivered: int) -> None:
    tps = TlsStoreSCP(tmp_path / "tps", pki)
    try:
        store = Store(tmp_path / "var")
        arrival = Arrival(sop_uid="1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                          series_uid="1.2.3.1", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
                          called_ae="IE_GATEWAY")
        job_id, _, _ = store.accept(arrival, (b"x",), dict)
        result = store.job_dir(job_id) / "result.dcm"
        shutil.copy(small_series[0], result)
        outbox = Outbox(store.index)
        outbox.enqueue(job_id, "TPS", str(result.relative_to(store.results)), "1.2.3.9", CT_IMAGE)
        dest = Destination(ae_title="TPS", host=host, port=tps.port,
                           tls=DestinationTLS(ca=str(pki[ca].cert), cert=str(pki["node"].cert),
                                              key=str(pki["node"].key), check_hostname=check_hostname))
        [attempt] = Sender({"TPS": dest}, DeliverySettings(), outbox, store.results).deliver_due()
        assert attempt.result(timeout=60) == delivered
        assert len(tps.received()) == delivered
        [row] = store.index.db.query("SELECT state, attempts FROM outbox")
        # refused: an attempt that failed, retried later (nothing lost)
        assert tuple(row) == ("delivered" if delivered else "pending", 1)
    finally:
        tps.stop()


def test_check_config_refuses_an_expired_certificate_and_a_key_that_is_not_its_own(
        node_factory: object, pki: dict[str, Pair], tmp_path: Path) -> None:
    def check(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
        node: Node = node_factory(f"n{len(list(tmp_path.iterdir()))}", settings={"node": {  # type: ignore[operator]
            "tls": {"cert": str(cert), "key": str(key)}}})
        return node.cli("check-config", check=False)

    assert check(pki["node"].cert, pki["node"].key).returncode == 0
    expired = check(expired_copy(pki["node"], tmp_path), pki["node"].key)
    assert expired.returncode != 0 and "expired on" in expired.stderr
    mismatched = check(pki["node"].cert, pki["pacs"].key)
    assert mismatched.returncode != 0 and "does not match the certificate" in mismatched.stderr


def test_certificate_and_key_from_systemd_credentials(node_factory: object, pki: dict[str, Pair],
                                                      tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(pki["node"].cert, creds / "node.crt")
    shutil.copy(pki["node"].key, creds / "node.key")
    tls_port = free_port()
    node: Node = node_factory(env={"CREDENTIALS_DIRECTORY": str(creds)}, settings={"node": {  # type: ignore[operator]
        "tls": {"port": tls_port, "cert": "credential:node.crt", "key": "credential:node.key"}}})
    assert node.cli("check-config").returncode == 0
    node.start()
    result = dcmtk_tls("echoscu", tls_port, pki["pacs"], pki["ca"])
    assert result.returncode == 0, result.stderr

    node.stop()
    node.env.pop("CREDENTIALS_DIRECTORY")
    refused = node.cli("check-config", check=False)
    assert refused.returncode != 0 and "CREDENTIALS_DIRECTORY" in refused.stderr

"""`ie-gateway demo`: the newcomer's first five minutes, on loopback, with no peers to install.

Starts a node with a bundled demo model (demo-thorax, or `--model demo-thorax-nnunet`) and a small
receiving SCP standing in for the TPS,
sends a synthetic thorax CT, and prints where the RT-STRUCT, the SEG and the QA picture landed.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml
from pydicom.uid import RTStructureSetStorage, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from ie_gateway import reactor
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.errors import GatewayError
from ie_gateway.receive import VERIFICATION
from ie_gateway.store import JobState

log = structlog.get_logger(__name__)
DEMO_CALLER = "IE_DEMO"
DEMO_TPS = "DEMO_TPS"
FINAL = {JobState.DELIVERED, JobState.FAILED, JobState.REFUSED, JobState.UNROUTED, JobState.NEEDS_REVIEW}


@dataclass(frozen=True)
class DemoResult:
    state: str
    reason: str | None
    received: list[Path]
    qa_png: str | None
    seconds: float
    config: Path  # the demo node's gateway.yaml: `ie-gateway serve --config` it to look again
    page: str | None  # the admin page's address, when the node serves HTTP


def page_address(cfg: GatewayConfig) -> str | None:
    """The admin page's jobs list, when the node serves HTTP."""
    http = cfg.http
    return f"http://{http.bind}:{http.port}/jobs" if http.enabled else None


@contextmanager
def _held_ports(count: int) -> Iterator[list[int]]:
    """Free loopback ports, held (bound, not listening) until the demo's listeners have bound them:
    a port only looked up and let go could meanwhile be taken by another program's listener or
    outgoing connection. The listeners (pynetdicom, uvicorn) set SO_REUSEADDR, as the hold does, so
    they bind beside it; nobody else can."""
    with ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
        yield [int(sock.getsockname()[1]) for sock in held]


def _demo_config(base: GatewayConfig, workdir: Path, ports: list[int], model: str) -> Path:
    """A node config for the demo: the base's models, a rule for ``model``, loopback only.
    ``ports``: the node's DICOM port, its HTTP port, the demo TPS's port."""
    node_port, http_port, tps_port = ports
    """A node config for the demo: the base's models, a rule for ``model``, loopback only."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "routing.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "demo",
                        "match": {"Modality": "CT"},
                        "model": model,
                        "outputs": ["rtstruct", "seg"],
                        "send_to": [DEMO_TPS],
                    }
                ]
            },
            sort_keys=False,
        )
    )
    config = workdir / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {
                    "ae_title": base.node.ae_title,
                    "bind": "127.0.0.1",
                    "port": node_port,
                    "allowed_callers": [{"ae_title": DEMO_CALLER}],
                },
                "storage": {"root": str(workdir / "var")},
                "http": {"bind": "127.0.0.1", "port": http_port},  # must not clash with a running node
                "series": {"stable_after_s": 2, "sweep_every_s": 0.5},
                "routing_file": "routing.yaml",
                "models_dir": str(base.models_dir),
                "destinations": {DEMO_TPS: {"ae_title": DEMO_TPS, "host": "127.0.0.1", "port": tps_port}},
                "delivery": {"base_s": 1, "every_s": 0.5},
                "inference": base.inference.model_dump(mode="json"),
                "trusted_keys": [key.model_dump(mode="json") for key in base.trusted_keys],
                "log_level": "warning",
            },
            sort_keys=False,
        )
    )
    return config


def _start_tps(folder: Path, port: int) -> ThreadedAssociationServer:
    folder.mkdir(parents=True, exist_ok=True)

    def store(event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # EVT_C_STORE carries a C-STORE request
        ds = event.dataset  # decoded here whether or not the node in this process receives in chunks
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{request.AffectedSOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title=DEMO_TPS)
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(RTStructureSetStorage)
    ae.add_supported_context(SegmentationStorage)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert server is not None  # block=False returns the running server
    return server


def send_series(files: list[Path], port: int, called_ae: str, calling_ae: str = DEMO_CALLER) -> None:
    """C-STORE a CT series to a node on loopback in one association, as a scanner would (the
    demo and the benchmarks send alike); GatewayError on a refusal or a non-Success status."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = reactor.associate(ae, "127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise GatewayError("the node refused the association")
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if int(status.get("Status", 0xFFFF)) != 0:
                raise GatewayError(f"the node answered 0x{int(status.Status):04X} to an instance")
    finally:
        assoc.release()


def run_demo(base_config: Path, workdir: Path, slices: int, timeout_s: float, model: str = "demo-thorax") -> DemoResult:
    """Run the whole path once on loopback with ``model`` and return where the results are."""
    from ie_gateway.service import Service

    base = load_config(base_config)
    with _held_ports(3) as ports:
        cfg = load_config(_demo_config(base, workdir, ports, model))
        tps_port = ports[2]
        server = _start_tps(workdir / "tps", tps_port)
        service = Service(cfg)
        service.start()
    started = time.monotonic()
    try:
        print(
            f"node {cfg.node.ae_title} on 127.0.0.1:{cfg.node.port}; demo TPS on 127.0.0.1:{tps_port}", file=sys.stderr
        )
        files = write_ct_series(make_phantom(2026, slices=slices), workdir / "ct", seed=2026)
        print(f"sending a synthetic thorax CT: {len(files)} slices of 512x512", file=sys.stderr)
        send_series(files, cfg.node.port, cfg.node.ae_title)
        job = None
        while time.monotonic() - started < timeout_s:
            jobs = service.store.index.jobs()
            job = jobs[-1] if jobs else None
            if job is not None and job.state in FINAL:
                break
            time.sleep(0.5)  # poll interval while the node works
        if job is None:
            raise GatewayError("the node never saw the series")
        return DemoResult(
            state=job.state.value,
            reason=job.reason,
            received=sorted((workdir / "tps").glob("*.dcm")),
            qa_png=str(service.store.qa_png(job)) if job.detail.qa_png else None,
            seconds=time.monotonic() - started,
            config=cfg.source,
            page=page_address(cfg),
        )
    finally:
        service.stop()
        server.shutdown()

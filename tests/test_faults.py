"""Faults the node must outlive: a job that keeps killing its process, a disk that fills while
results are written, an index that goes away, CUDA out of memory, secrets in error text.

Real peers where they can run here (the node, dcmtk, Orthanc, a pynetdicom TPS, PostgreSQL,
Azurite); the GPU cannot, so CUDA out of memory is raised at our own seam (the runner).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import psycopg
import pytest
import structlog
import yaml
from psycopg.conninfo import conninfo_to_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import RTStructureSetStorage

from ie_gateway import log as logsetup
from ie_gateway.config import DeliverySettings, Destination, GatewayConfig, Reserve
from ie_gateway.errors import InferenceOutOfMemory, StoreError
from ie_gateway.infer.registry import registry_for
from ie_gateway.infer.runner import InferenceRunner, error_reply
from ie_gateway.infer.types import InferenceResult
from ie_gateway.ops.health import Health
from ie_gateway.pipeline import Worker, transient
from ie_gateway.route.rules import RuleSet
from ie_gateway.send import Sender
from ie_gateway.store import Arrival, JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.space import disk_space
from ie_gateway.sync.blob import CONNECTION_STRING_ENV
from ie_gateway.sync.run import scheduled_models
from ie_gateway.vocab import OutboxState
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.peers import Node, Orthanc, storescu, wait_until
from tests.test_delivery import StoreSCP, destination, make_node, misplaced_heart_model, transitions
from tests.test_disk import MIB, fill, small_fs  # noqa: F401  (fixture)
from tests.test_service import child_pids, models, rule, running, series
from tests.test_service import transitions as moves

# --- a job that keeps killing its inference process --------------------------------------------


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def inference_children(node: Node) -> list[int]:
    return [e["child_pid"] for e in node.log_events() if e["event"] == "inference_child_started"]


def kill_busy_child(node: Node, attempt: int) -> None:
    """Wait until the slow job's ``attempt``-th run is computing in the inference child, then kill
    the child as the kernel's OOM killer would."""
    wait_until(
        lambda: sum(e["event"] == "volume_loaded" for e in node.log_events()) >= attempt,
        120,
        what=f"run {attempt} of the slow job to load its volume",
    )
    pid = inference_children(node)[-1]
    start = cpu_ticks(pid)
    wait_until(lambda: cpu_ticks(pid) > start + 50, 60, every=0.1, what="the inference child to be busy")
    os.kill(pid, signal.SIGKILL)


@pytest.mark.peer
@pytest.mark.slow
def test_a_job_that_kills_its_inference_process_twice_fails_and_the_next_series_is_delivered(
    node_factory: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    node: Node = node_factory(
        settings={
            "models_dir": str(models(tmp_path / "models", spin_iterations=400000)),
            "destinations": {"TPS": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        },
        rules={"rules": [rule("fast", "Fast", "toy-body"), rule("slow", "Slow", "slow-body")]},
    ).start()
    assert storescu(node.port, series(tmp_path / "slow", 21, "Slow")).returncode == 0
    [slow] = node.wait_state({"inferring"})
    assert storescu(node.port, series(tmp_path / "fast", 22, "Fast")).returncode == 0
    kill_busy_child(node, 1)
    kill_busy_child(node, 2)
    [failed] = node.wait_state({"failed"}, timeout=120)
    assert failed["id"] == slow["id"]
    assert failed["reason"].startswith("crashed the node 2 times at infer (last: inference process died (killed by")
    [delivered] = node.wait_state({"delivered"}, timeout=180)
    assert delivered["model"] == "toy-body"
    assert len(orthanc.get("/instances")) == 1


def kill_node_mid_inference(node: Node, job_id: int, attempt: int) -> None:
    """Kill -9 the node (as the kernel's OOM killer would) during the job's ``attempt``-th inference."""
    index = node.root / "index.sqlite3"
    wait_until(lambda: moves(index, job_id).count(("prepared", "inferring")) >= attempt, 180,
               what=f"inference attempt {attempt}")  # fmt: skip
    assert node.proc is not None
    children = child_pids(node.proc.pid)
    node.kill9()
    wait_until(lambda: not any(running(pid) for pid in children), 30, every=0.2,
               what="the killed node's inference child to stop")  # fmt: skip


@pytest.mark.peer
@pytest.mark.slow
def test_a_series_that_kills_the_node_twice_fails_at_the_next_start_and_the_next_series_is_delivered(
    node_factory: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    # each series is one job, complete at its last instance (a long quiet period, a counted
    # series); the next one comes once the node is up again after the second crash: a job in
    # any stage when the node is killed has that crash counted too (the node cannot tell
    # whose work killed it), so a next series waiting there twice would be parked as well
    node: Node = node_factory(
        settings={
            "models_dir": str(models(tmp_path / "models", spin_iterations=400000)),
            "destinations": {"TPS": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "series": {"stable_after_s": 600},
        },
        rules={"rules": [rule("fast", "Fast", "toy-body"), rule("slow", "Slow", "slow-body")]},
    ).start()
    assert storescu(node.port, series(tmp_path / "slow", 23, "Slow", counted=True)).returncode == 0
    [slow] = node.wait_state({"inferring"})
    kill_node_mid_inference(node, slow["id"], 1)
    node.start()
    kill_node_mid_inference(node, slow["id"], 2)
    node.start()
    assert storescu(node.port, series(tmp_path / "fast", 24, "Fast", counted=True)).returncode == 0
    [failed] = node.wait_state({"failed"}, timeout=120)
    assert failed["id"] == slow["id"]
    assert failed["reason"] == "crashed the node 2 times at infer"
    assert failed["crashes"] == {"infer": 2}  # as `status --json` shows it
    [delivered] = node.wait_state({"delivered"}, timeout=180)
    assert delivered["model"] == "toy-body"
    assert any(e["event"] == "stage interrupted by a crash" and e["crashes"] == 2 for e in node.log_events())


# --- a full disk while writing ---------------------------------------------------------------------


@pytest.fixture
def tps() -> Iterator[StoreSCP]:
    scp = StoreSCP("TPS", [RTStructureSetStorage]).start()
    yield scp
    scp.stop()


@pytest.mark.peer
@pytest.mark.slow
def test_a_disk_that_fills_while_results_are_written_is_retried_and_delivered_once_space_is_back(
    node_factory: Any,
    tps: StoreSCP,
    small_fs: Path,  # noqa: F811
    small_series: list[Path],
    tmp_path: Path,
) -> None:
    node = make_node(
        node_factory,
        misplaced_heart_model(tmp_path / "models"),
        {"TPS": destination(tps.port, accepts=["rtstruct"])},
        {"model": "toy-heart", "outputs": ["rtstruct"], "send_to": ["TPS"]},
    )
    settings = yaml.safe_load(node.config.read_text())
    settings["storage"] = {"root": str(small_fs / "var"), "reserve": {"percent": 0, "gb": 0}}
    settings["worker"] = {"retry_base_s": 1, "retry_cap_s": 2, "lease_s": 5}
    node.config.write_text(yaml.safe_dump(settings))
    node.root = small_fs / "var"
    node.start()
    assert storescu(node.port, small_series).returncode == 0
    [held] = node.wait_state({"needs_review"}, timeout=180)  # results not yet written
    filler = fill(small_fs, leave_free=2 * MIB)  # room for the admin's release
    node.cli("release", str(held["id"]))
    more = small_fs / "more"
    more.mkdir()
    rest = fill(more, leave_free=32 * 1024)  # the disk is full as the worker starts writing
    # whichever write finds the disk full first (a result file, the index) waits and is retried
    waits = ("transient failure; the job is retried", "index unavailable; the worker waits")
    [first, *_] = wait_until(
        lambda: [e for e in node.log_events() if e["event"] in waits],
        120,
        every=0.5,
        what="the write stage to find the disk full and wait to retry",
    )
    assert "full" in first.get("reason", first.get("error", "")), first
    assert node.jobs()[0]["state"] in ("inferred", "writing", "sending")
    rest.unlink()
    filler.unlink()
    [job] = node.wait_state({"delivered", "failed"}, timeout=120)
    assert job["state"] == "delivered", job
    assert len(tps.received) == 1
    reasons = [reason or "" for _, reason, _, _ in transitions(node, job["id"])]
    assert not any("failed" in r for r in reasons)


class TPSThatFillsTheDisk(StoreSCP):
    """A planning system that takes a file and, before it answers, fills the node's disk: the
    node's record that the file was delivered finds no room."""

    def __init__(self, disk: Path) -> None:
        super().__init__("TPS", [RTStructureSetStorage])
        self.disk = disk
        self.filler: Path | None = None

    def _store(self, event: Any) -> int:
        if self.filler is None:
            self.filler = fill(self.disk, leave_free=0)
        return super()._store(event)


def rtstruct_file(path: Path, sop_uid: str) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, sop_uid, "RTSTRUCT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = RTStructureSetStorage, sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.peer
def test_a_file_the_tps_took_as_the_disk_filled_is_recorded_when_there_is_room_and_not_sent_again(
    small_fs: Path,  # noqa: F811
) -> None:
    store = Store(small_fs / "var")
    job, _ = store.index.add_instance(
        sop_uid="1.2.3.1", sop_class="1.2.840.10008.5.1.4.1.1.2", transfer_syntax=ExplicitVRLittleEndian,
        study_uid="1.2.3", series_uid="1.2.3.0", path="ct.dcm", size=1, calling_ae="PACS",
        called_ae="IE_GATEWAY", header=dict,
    )
    path = store.job_dir(job) / "rtstruct-0.dcm"
    rtstruct_file(path, "1.2.3.4")
    outbox = Outbox(store.index)
    outbox.enqueue(job, "TPS", str(path.relative_to(store.results)), "1.2.3.4", str(RTStructureSetStorage))
    tps = TPSThatFillsTheDisk(small_fs).start()
    sender = Sender({"TPS": Destination(ae_title="TPS", host="127.0.0.1", port=tps.port)}, DeliverySettings(),
                    outbox, store.results)
    try:
        with structlog.testing.capture_logs() as logs:
            [future] = sender.deliver_due()
            [retry, *_] = wait_until(
                lambda: [e for e in logs if e["event"] == "delivery not recorded yet; retrying"], 30,
                every=0.1, what="the record of the delivery to find the disk full")
            assert tps.filler is not None
            tps.filler.unlink()
            assert future.result(timeout=60) == 1
    finally:
        sender.close()
        tps.stop()
    assert "full" in retry["error"], retry
    assert [ds.SOPInstanceUID for ds in tps.received] == ["1.2.3.4"]
    assert outbox.job_summary(job) == {OutboxState.DELIVERED: 1}


# --- the index going away under the worker -------------------------------------------------------


def in_process_worker(root: Path, index: str) -> Worker:
    """A worker with no model and no rules: every job it routes ends `unrouted`."""
    (root / "routing.yaml").write_text("rules: []\n")
    cfg = GatewayConfig.model_validate(
        {
            "storage": {"root": str(root / "var"), "index": index},
            "routing_file": str(root / "routing.yaml"),
            "models_dir": str(root),
        }
    )
    store = Store.for_settings(cfg.storage)
    return Worker(cfg, store, registry_for(cfg), InferenceRunner(60), lambda: RuleSet(rules=()))


def set_connections(url: str, allowed: bool) -> None:
    """Let clients into the test database, or shut it: refuse new ones and end those open."""
    name = conninfo_to_dict(url)["dbname"]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.mark.postgres
def test_the_worker_survives_the_index_going_away_under_its_claims(tmp_path: Path, postgres_url: str) -> None:
    worker = in_process_worker(tmp_path, postgres_url)
    store = worker.store
    job_id, _, _ = store.accept(
        Arrival(
            sop_uid="1.2.3.4.1",
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            transfer_syntax="1.2.840.10008.1.2.1",
            calling_ae="PACS",
            called_ae="IE_GATEWAY",
        ),
        (b"DICM-bytes",),
        lambda: {"Modality": "CT"},
    )
    worker.start()
    try:
        set_connections(postgres_url, False)
        ticks = [worker.last_tick]

        def looped_again() -> bool:  # each turn of the loop claims, and every claim now fails
            if worker.last_tick != ticks[-1]:
                ticks.append(worker.last_tick)
            return len(ticks) > 3

        wait_until(looped_again, 30, what="three claims against the missing index")
        assert worker.alive()
        health = Health(
            worker.store,
            listening=None,
            worker_alive=worker.alive,
            worker_last_tick=lambda: worker.last_tick,
            scheduler_running=lambda: True,
            space=lambda: disk_space(tmp_path, Reserve()),
            inference_timeout_s=60,
        )
        assert health.watchdog_ok()  # the index is out: not a thing a restart cures, and no exception
        assert not health.ready()
        set_connections(postgres_url, True)
        index = Store.for_settings(worker.cfg.storage).index  # this thread's connection was ended too
        index.transition(job_id, JobState.COMPLETE)
        worker.wake()
        wait_until(lambda: index.job(job_id).state is JobState.UNROUTED, 30, what="the job to be routed")
    finally:
        set_connections(postgres_url, True)
        worker.stop()


# --- CUDA out of memory ------------------------------------------------------------------------------


class OutOfMemoryRunner:
    """The GPU runner, as it answers when CUDA has no memory left (what the child reports)."""

    def run(self, *_: Any) -> dict[str, Any]:
        raise InferenceOutOfMemory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")


class CpuRunner:
    """The CPU runner the worker starts for the retry; records what it ran."""

    runs: ClassVar[list[tuple[Any, ...]]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def run(self, *args: Any) -> InferenceResult:
        self.runs.append(args)
        return InferenceResult(volumes_cc={"Heart": 600.0}, timings_s={}, windows=1, folds=1)


def test_cuda_out_of_memory_runs_the_job_once_on_the_cpu(tmp_path: Path) -> None:
    worker = in_process_worker(tmp_path, "sqlite")
    worker.runner = OutOfMemoryRunner()  # type: ignore[assignment]
    worker.cpu_runner = CpuRunner  # type: ignore[assignment]
    result = worker.segment("model", tmp_path / "ct.mha", tmp_path / "labels.mha")  # type: ignore[arg-type]
    assert result.volumes_cc == {"Heart": 600.0}
    assert CpuRunner.runs == [("model", tmp_path / "ct.mha", tmp_path / "labels.mha")]


def test_cuda_out_of_memory_without_the_cpu_is_transient(tmp_path: Path) -> None:
    worker = in_process_worker(tmp_path, "sqlite")
    worker.runner = OutOfMemoryRunner()  # type: ignore[assignment]
    worker.cpu_runner = None
    with pytest.raises(InferenceOutOfMemory) as caught:
        worker.segment("model", tmp_path / "ct.mha", tmp_path / "labels.mha")  # type: ignore[arg-type]
    assert transient(caught.value)
    assert transient(StoreError("index unavailable: connection refused"))
    assert transient(OSError(28, "No space left on device"))
    assert not transient(OSError(13, "Permission denied"))


def test_the_inference_child_tells_cuda_out_of_memory_and_a_full_disk_from_other_errors() -> None:
    import torch

    oom = error_reply(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.kind == "oom" and oom.text.startswith("OutOfMemoryError: CUDA out of memory")
    assert error_reply(RuntimeError("shape mismatch")).kind == "inference"
    assert error_reply(OSError(28, "No space left on device")).kind == "disk_full"  # the worker waits for space


# --- secrets never logged --------------------------------------------------------------------------

CANARY = "CANARY0sig0c2VjcmV0"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The node's logging into a buffer; no logger keeps it afterwards (later tests capture logs)."""
    stream = io.StringIO()
    logsetup.configure("debug", stream=stream)
    structlog.configure(cache_logger_on_first_use=False)
    yield stream
    logsetup.configure("info")
    structlog.reset_defaults()


def test_secrets_in_an_exception_and_its_traceback_are_redacted(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("test")
    try:
        raise RuntimeError(
            f"GET https://acct.blob.core.windows.net/c/x?sv=2021-08-06&sig={CANARY} failed; "
            f"AccountKey={CANARY}==; SharedAccessSignature=sv=1&sig={CANARY}; "
            f"postgresql://gw:{CANARY}@db/ie; Authorization: Bearer {CANARY}.x.y"
        )
    except RuntimeError as exc:
        log.exception("sync failed", error=str(exc))
        logging.getLogger("azure.test").exception("stdlib: the same failure")
    text = log_stream.getvalue()
    assert CANARY not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert all("Traceback" in line["exception"] for line in lines)
    assert "sig=[redacted]" in lines[0]["error"] and "AccountKey=[redacted]" in lines[0]["error"]
    assert "postgresql://gw:[redacted]@db/ie" in lines[0]["error"]
    assert "Bearer [redacted]" in lines[0]["error"]


@pytest.mark.peer
def test_a_sas_never_reaches_the_log_when_a_sync_fails(
    azurite_blob: str,  # noqa: F811
    tmp_path: Path,
    log_stream: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = azurite_blob.split("BlobEndpoint=")[1].rstrip(";")
    # a SAS that Azurite refuses: the pull fails with the token in every request URL
    monkeypatch.setenv(
        CONNECTION_STRING_ENV,
        f"BlobEndpoint={endpoint};SharedAccessSignature=sv=2021-08-06&ss=b"
        f"&srt=sco&sp=rl&se=2030-01-01T00:00:00Z&sig={CANARY}",
    )
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    cfg = GatewayConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "var")},
            "sync": {"enabled": True},
            "routing_file": str(tmp_path / "routing.yaml"),
            "models_dir": str(tmp_path),
        }
    )
    logging.getLogger("urllib3").setLevel(logging.DEBUG)  # request lines carry the URL, query included
    scheduled_models(cfg, registry_for(cfg))
    text = log_stream.getvalue()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(e["event"] == "model pull not run" for e in events)
    assert any("sig=[redacted]" in json.dumps(e) for e in events)  # the URL was logged, its signature was not
    assert CANARY not in text


# --- a case sync can never take ---------------------------------------------------------------------


@pytest.mark.peer
def test_a_case_that_cannot_be_anonymised_ends_excluded_with_its_reason_and_is_not_tried_again(
    azurite_blob: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from ie_gateway.sync.anonymise import Anonymiser
    from ie_gateway.sync.blob import container_client
    from ie_gateway.sync.upload import cases_due, sync_cases
    from tests.jobs import job_route
    from tests.sync_samples import make_ct

    store = Store(tmp_path / "var")
    job_id, _, _ = store.accept(
        Arrival(
            sop_uid="1.2.3.4.1",
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            transfer_syntax="1.2.840.10008.1.2.1",
            calling_ae="PACS",
            called_ae="IE_GATEWAY",
        ),
        (b"DICM-bytes",),
        lambda: {"Modality": "CT"},
    )
    index = store.index
    index.transition(job_id, JobState.COMPLETE)
    index.transition(job_id, JobState.ROUTED, routes=[job_route(sync=True)])
    for state in (JobState.INFERRING, JobState.INFERRED, JobState.SENDING, JobState.DELIVERED):
        index.transition(job_id, state)
    burned = make_ct(tmp_path / "ct", burned_in="YES")  # text in the pixels: never to leave the node
    index.update_detail(job_id, lambda d: replace(d, slice_files=tuple(map(str, burned))))
    container = container_client(azurite_blob, None, "excluded")
    container.create_container()
    anonymiser = Anonymiser(b"excluded-test-key-0123456789", tmp_path / "map.json")
    report = sync_cases(store, container, anonymiser)
    job = index.job(job_id)
    assert job.state is JobState.EXCLUDED
    assert job.reason == (
        "excluded from sync: cannot be anonymised: series is flagged BurnedInAnnotation=YES; it is excluded from upload"
    )
    assert report.failed == {job_id: job.reason}
    assert cases_due(store) == []
    assert list(container.list_blobs()) == []


def test_a_volume_that_does_not_fit_on_the_disk_is_a_transient_disk_full(small_fs: Path) -> None:  # noqa: F811
    import SimpleITK as sitk

    from ie_gateway.pipeline import _write_image

    image = sitk.Image([512, 512, 120], sitk.sitkInt16)  # 60 MiB on a 48 MiB filesystem
    with pytest.raises(OSError) as caught:
        _write_image(image, small_fs / "ct.mha")
    assert transient(caught.value)
    assert list(small_fs.iterdir()) == []  # no partial file left

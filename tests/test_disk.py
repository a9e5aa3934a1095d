"""A disk that fills: refused cleanly before it is full, recovered from by itself, and retention
that frees space without touching what is not yet delivered."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ie_gateway.store import Arrival, Store
from ie_gateway.store.states import JobState
from tests.jobs import job_route
from tests.peers import Node, echoscu, storescu, wait_until

MIB = 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs mounted for this test alone."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path, leave_free: int) -> Path:
    """A filler file that leaves about ``leave_free`` bytes free on the filesystem."""
    st = os.statvfs(folder)
    filler = folder / "filler.bin"
    with filler.open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_free))
    return filler


def consistent(root: Path) -> tuple[int, list[str]]:
    """(indexed instances, problems): every row has its file, every file a row, no temp files."""
    with sqlite3.connect(root / "index.sqlite3") as db:
        rows = {r[0] for r in db.execute("SELECT path FROM instances")}
    files = {str(p.relative_to(root / "spool")) for p in (root / "spool").rglob("*") if p.is_file()}
    problems = [f"row without file: {r}" for r in rows - files] + [f"file without row: {f}" for f in files - rows]
    return len(rows), problems


@pytest.mark.peer
def test_below_the_reserve_new_associations_are_refused_and_acceptance_resumes_when_space_returns(
        node_factory: object, small_fs: Path, small_series: list[Path]) -> None:
    node: Node = node_factory(settings={"storage": {"root": str(small_fs / "var"),  # type: ignore[operator]
                                                    "reserve": {"percent": 0, "gb": 16 / 1024}}})
    node.start()
    series_bytes = sum(p.stat().st_size for p in small_series)
    filler = fill(small_fs, 16 * MIB + series_bytes // 2)  # the series will cross the reserve
    sent = storescu(node.port, small_series)
    assert sent.returncode == 0, sent.stderr  # in flight when the reserve was crossed: it finishes
    assert consistent(small_fs / "var") == (len(small_series), [])

    refused = echoscu(node.port)
    assert refused.returncode != 0
    assert "Local Limit Exceeded" in refused.stderr or "local-limit-exceeded" in refused.stderr.lower(), refused.stderr
    status, body = node.http_get("/readyz")
    assert status == 503 and not json.loads(body)["checks"]["disk"]["ok"]

    filler.unlink()
    wait_until(lambda: echoscu(node.port).returncode == 0, 30, what="acceptance to resume")
    assert node.http_get("/readyz")[0] == 200


@pytest.mark.peer
@pytest.mark.slow
def test_a_disk_that_fills_mid_association_answers_out_of_resources_and_leaves_nothing_half_written(
        node_factory: object, small_fs: Path, small_series: list[Path]) -> None:
    node: Node = node_factory(settings={"storage": {"root": str(small_fs / "var"),  # type: ignore[operator]
                                                    "reserve": {"percent": 0, "gb": 0}}})
    node.start()
    fill(small_fs, sum(p.stat().st_size for p in small_series) // 3)
    sent = storescu(node.port, small_series)
    assert sent.returncode != 0
    metrics = node.http_get("/metrics")[1].decode()
    assert 'ie_gateway_cstore_responses_total{status="0xA700"}' in metrics
    assert any(e["event"] == "instance not stored" and e["reason"] == "storage failure" for e in node.log_events())
    stored, problems = consistent(small_fs / "var")
    assert 0 < stored < len(small_series)
    assert problems == []


def _delivered_series(store: Store, n: int, state: JobState = JobState.DELIVERED,
                      routes: list[dict[str, object]] | None = None) -> int:
    arrival = Arrival(sop_uid=f"1.2.3.{n}.1", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                      series_uid=f"1.2.3.{n}", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
                      called_ae="IE_GATEWAY")
    job_id, _, _ = store.accept(arrival, (b"x" * 1000,), dict)
    path = [JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING, JobState.INFERRED, JobState.SENDING]
    if state is JobState.DELIVERED:
        path.append(JobState.DELIVERED)
    elif state is JobState.FAILED:
        path.append(JobState.FAILED)
    for to in path:
        store.index.transition(job_id, to, **({"routes": routes} if to is JobState.ROUTED and routes else {}))
    return job_id


def test_pressure_purges_delivered_series_oldest_first_and_never_undelivered_or_unsynced(tmp_path: Path) -> None:
    store = Store(tmp_path / "var")
    oldest = _delivered_series(store, 1)
    newer = _delivered_series(store, 2)
    failed = _delivered_series(store, 3, JobState.FAILED)
    sending = _delivered_series(store, 4, JobState.SENDING)
    unsynced = _delivered_series(store, 5, routes=[job_route(sync=True)])
    purged: list[int] = []

    assert store.purge_for_space(lambda: len(purged_jobs(store)) >= 1, sync_enabled=True) == 1
    purged = purged_jobs(store)
    assert purged == [oldest]

    assert store.purge_for_space(lambda: False, sync_enabled=True) == 1  # however full the disk
    assert purged_jobs(store) == [oldest, newer]
    for job_id in (failed, sending, unsynced):
        assert store.instance_files(store.index.job(job_id)), f"job {job_id} lost its instances"


def purged_jobs(store: Store) -> list[int]:
    return [j.id for j in store.index.jobs() if j.detail.purged]


@pytest.mark.peer
@pytest.mark.slow
def test_a_running_node_below_the_reserve_purges_a_delivered_series_and_accepts_again(
        node_factory: object, small_fs: Path, small_series: list[Path], tmp_path: Path) -> None:
    from tests.peers import Orthanc
    from tests.test_pipeline import RULES, toy_models

    tps = Orthanc(tmp_path / "tps").start()
    try:
        node: Node = node_factory(settings={  # type: ignore[operator]
            "storage": {"root": str(small_fs / "var"), "reserve": {"percent": 0, "gb": 16 / 1024}},
            "models_dir": str(toy_models(tmp_path / "models")),
            "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port,
                                     "accepts": ["rtstruct"]}},
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
            "inference": {"timeout_s": 120},
        }, rules=RULES)
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
        assert job["state"] == "delivered", job
        fill(small_fs, 15 * MIB)  # 1 MiB below the reserve; the delivered series holds more than that
        assert echoscu(node.port).returncode != 0  # refused while below the reserve

        # the node's own disk-pressure task (every 10 s) purges the delivered series
        wait_until(lambda: node.jobs()[0].get("purged") is True, 60, what="the delivered series purged")
        assert wait_until(lambda: echoscu(node.port).returncode == 0, 30, what="acceptance to resume")
        assert not list((small_fs / "var" / "spool").rglob("*.dcm"))
    finally:
        tps.stop()

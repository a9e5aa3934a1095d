"""Past one VM: a receiver and several workers, separate processes sharing a PostgreSQL index
and a spool, deliver every series once; a worker killed mid-inference loses nothing.

The peers are real: dcmtk's storescu sends, Orthanc is the TPS, PostgreSQL is a throw-away
cluster (tests/postgres.py). The nodes are `ie-gateway serve --role receiver|worker`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ie_gateway.store import Store
from tests.peers import Node, Orthanc, storescu
from tests.test_service import models, rule, series


def test_a_role_other_than_all_refuses_an_index_of_its_own(tmp_path: Path) -> None:
    node = Node(tmp_path / "worker", role="worker")
    result = node.cli("serve", "--role", "worker", check=False)
    assert result.returncode != 0
    assert "--role worker shares the index with other nodes" in result.stderr
    assert "postgresql://" in result.stderr


def test_a_password_in_the_index_url_is_a_config_error(tmp_path: Path) -> None:
    node = Node(tmp_path / "node", settings={"storage": {"root": "var", "index": "postgresql://gw:secret@db/gw"}})
    result = node.cli("check-config", check=False)
    assert result.returncode != 0 and "PGPASSWORD" in result.stderr
    assert "secret" not in result.stderr  # the refusal does not echo it




def cluster(node_factory: Any, tmp_path: Path, postgres_url: str, tps: Orthanc, workers: int,
            spin: int = 0) -> tuple[Node, list[Node]]:
    """One receiver and ``workers`` workers on one shared root and index, started."""
    shared = tmp_path / "shared"
    settings: dict[str, Any] = {
        "storage": {"root": str(shared), "index": postgres_url},
        "models_dir": str(models(tmp_path / "models", spin)),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
        "worker": {"lease_s": 6},
        "delivery": {"every_s": 0.5},
    }
    rules = {"rules": [rule("fast", "Fast", "toy-body"), *([rule("slow", "Slow", "slow-body")] if spin else [])]}
    receiver = node_factory("receiver", settings=settings, rules=rules, role="receiver").start()
    crew = [node_factory(f"worker{i}", settings=settings, rules=rules, role="worker").start(echo=False)
            for i in range(workers)]
    return receiver, crew


def tps_rtstructs(tps: Orthanc) -> list[str]:
    """SOP Instance UIDs of every RT Structure Set the TPS holds."""
    found = tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}, "Expand": True})
    return sorted(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in found)


@pytest.mark.peer
@pytest.mark.postgres
@pytest.mark.slow
def test_twelve_series_through_one_receiver_and_three_workers_are_each_delivered_once(
        node_factory: Any, tmp_path: Path, postgres_url: str, orthanc: Orthanc) -> None:
    receiver, workers = cluster(node_factory, tmp_path, postgres_url, orthanc, workers=3)
    folders = [tmp_path / "ct" / f"s{i:02d}" for i in range(12)]
    for i, folder in enumerate(folders):
        series(folder, 100 + i, f"Fast {i}")
    assert storescu(receiver.port, tmp_path / "ct").returncode == 0
    rows = receiver.wait_state({"delivered"}, count=12, timeout=300)
    assert len(rows) == 12 and all(r["model"] == "toy-body" for r in rows)

    store = Store(tmp_path / "shared", postgres_url)
    sent = sorted(o.uids.sop_uid for job in store.index.jobs() for o in job.detail.plan.outputs)
    assert len(sent) == 12 and tps_rtstructs(orthanc) == sent
    successes = store.index.db.query(
        "SELECT outbox_id, COUNT(*) FROM attempts WHERE status = 0 GROUP BY outbox_id")
    assert len(successes) == 12 and {count for _, count in successes} == {1}  # no file went twice
    inferred = [e["job"] for w in workers for e in w.log_events() if e["event"] == "inferred"]
    assert sorted(inferred) == sorted(r["id"] for r in rows)  # each job inferred by one worker, once
    assert not any(e["event"] == "inferred" for e in receiver.log_events())  # the receiver only receives


@pytest.mark.peer
@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_killed_mid_inference_has_its_job_finished_by_another_with_the_same_uids(
        node_factory: Any, tmp_path: Path, postgres_url: str, orthanc: Orthanc) -> None:
    receiver, workers = cluster(node_factory, tmp_path, postgres_url, orthanc, workers=2, spin=1000)
    assert storescu(receiver.port, series(tmp_path / "slow", 7, "Slow")).returncode == 0
    [busy] = receiver.wait_state({"inferring"}, timeout=120)
    holder = busy["held_by"]
    [victim] = [w for w in workers if w.proc is not None and holder.endswith(f":{w.proc.pid}")]
    store = Store(tmp_path / "shared", postgres_url)
    planned = sorted(o.uids.sop_uid for o in store.index.job(busy["id"]).detail.plan.outputs)
    assert planned  # the results' UIDs were fixed when the series was routed
    victim.kill9()

    [done] = receiver.wait_state({"delivered"}, timeout=300)
    assert done["id"] == busy["id"]
    job = store.index.job(busy["id"])
    moves = [(t.from_state, t.to_state) for t in store.index.transitions(job.id)]
    assert ("inferring", "prepared") in moves and moves.count(("prepared", "inferring")) == 2
    assert tps_rtstructs(orthanc) == planned  # the same instance, one copy
    survivor = next(w for w in workers if w is not victim)
    assert any(e["event"] == "job taken over" for e in survivor.log_events())
    [stored] = orthanc.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
    ds = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{stored}/file")))
    assert ds.StructureSetROISequence and ds.SOPInstanceUID == planned[0]

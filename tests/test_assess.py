"""The assess stage: a linked clinician's structure set is compared after every CT stage, in a
state of its own, so a CT arriving meanwhile never waits behind it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import yaml
from pydicom.uid import RTStructureSetStorage, generate_uid

from ie_gateway.config import load_config
from ie_gateway.imaging import SliceGeometry
from ie_gateway.infer.registry import registry_for
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.pipeline import Worker
from ie_gateway.qa.assess import assess_structure_set
from ie_gateway.store import JobState, Store
from ie_gateway.vocab import Stage


def _series(store: Store, n: int, modality: str) -> int:
    job, _ = store.index.add_instance(
        sop_uid=f"1.2.3.{n}.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2.3",
        series_uid=f"1.2.3.{n}",
        path=f"{n}.dcm",
        size=1,
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
        header=lambda: {"Modality": modality},
    )
    store.index.transition(job, JobState.COMPLETE)
    return job


def test_a_ct_is_routed_before_a_structure_set_waiting_for_its_figures(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "gateway.yaml").write_text(
        yaml.safe_dump({"storage": {"root": "var"}, "models_dir": "models", "routing_file": "routing.yaml"})
    )
    cfg = load_config(tmp_path / "gateway.yaml")
    store = Store(cfg.storage.root)
    rt_job = _series(store, 1, "RTSTRUCT")
    ct_linked = _series(store, 2, "CT")
    store.index.transition(
        rt_job, JobState.ASSESSING, reason="linked", detail=replace(store.index.job(rt_job).detail, linked_to=ct_linked)
    )
    ct_job = _series(store, 3, "CT")  # arrives after the structure set
    runner = InferenceRunner(60, device="cpu", log_level=None)  # never started: no job reaches inference
    worker = Worker(cfg, store, registry_for(cfg), runner, rules=lambda: None)
    assert worker.STAGES[-1] == ((JobState.ASSESSING,), Stage.ASSESS)

    assert worker.run_once() and worker.run_once()  # both CTs first (no rules: parked failed)
    assert store.index.job(rt_job).state is JobState.ASSESSING
    assert {store.index.job(j).state for j in (ct_linked, ct_job)} == {JobState.FAILED}
    assert worker.run_once()
    done = store.index.job(rt_job)
    assert done.state is JobState.UNROUTED  # no approved file in it: linked, no figures
    assert done.reason == f"clinician's structure set, linked to job {ct_linked}"
    assert not worker.run_once()


def test_the_delivered_rtstruct_is_compared_without_what_its_names_file_left_out(tmp_path: Path) -> None:
    from ie_gateway.config import Destination
    from ie_gateway.infer.registry import Registry
    from ie_gateway.plan import plan_outputs
    from ie_gateway.qa.assess import _contours
    from ie_gateway.store import JobRoute, OutputKind
    from tests.infer_packages import threshold_model, write_package
    from tests.keys import DEMO_TRUSTED

    write_package(tmp_path / "models", [threshold_model(3)], name="toy", version="1", structures=2)
    names = tmp_path / "names.yaml"
    names.write_text("rois:\n  Lung_L: {send: false}\n")
    store = Store(tmp_path / "var")
    job = _series(store, 1, "CT")
    route = JobRoute(rule="r", model="toy", version="1", outputs=(OutputKind.RTSTRUCT,), send_to=("TPS",))
    dest = Destination(ae_title="TPS", host="127.0.0.1", port=104, names=names)
    plan = plan_outputs([route], {"TPS": dest})
    store.index.transition(job, JobState.ROUTED, routes=[route], detail=replace(store.index.job(job).detail, plan=plan))

    registry = Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED)
    contours = _contours(store, registry, store.index.job(job), 0)
    assert contours.rtstruct is not None and contours.rtstruct.name == "rtstruct-0-TPS.dcm"
    assert [s.name for s in contours.structures] == ["External"]  # Lung_L never reached the TPS


def _approved_set(path: Path, geometry: SliceGeometry) -> None:
    """An APPROVED RT-STRUCT with one ROI, External: a 4 x 4 pixel square on every slice."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ApprovalStatus = "APPROVED"
    ds.StructureSetROISequence = [pydicom.Dataset()]
    ds.StructureSetROISequence[0].ROINumber = 1
    ds.StructureSetROISequence[0].ROIName = "External"
    contours = []
    for position in geometry.positions:
        contour = pydicom.Dataset()
        square = [(2, 2), (2, 5), (5, 5), (5, 2)]
        contour.ContourData = [f"{v:.2f}" for r, c in square for v in (c, r, float(position[2]))]
        contour.NumberOfContourPoints = len(square)
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contours.append(contour)
    roi = pydicom.Dataset()
    roi.ReferencedROINumber = 1
    roi.ContourSequence = contours
    ds.ROIContourSequence = [roi]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_a_comparison_past_its_time_bound_leaves_the_set_linked_without_figures_and_says_why(tmp_path: Path) -> None:
    from ie_gateway.plan import labels_file
    from ie_gateway.store import JobRoute, OutputKind
    from tests.infer_packages import threshold_model, write_package
    from tests.keys import DEMO_PUB

    write_package(tmp_path / "models", [threshold_model(3)], name="toy", version="1", structures=1)
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    settings = {
        "storage": {"root": "var"},
        "models_dir": "models",
        "routing_file": "routing.yaml",
        "trusted_keys": [{"name": "demo", "public_key": str(DEMO_PUB)}],
        "agreement": {"timeout_s": 1e-9},  # past before the first structure
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(settings))
    cfg = load_config(tmp_path / "gateway.yaml")
    store = Store(cfg.storage.root)
    ct_job = _series(store, 1, "CT")
    route = JobRoute(rule="r", model="toy", version="1", outputs=(OutputKind.RTSTRUCT,), send_to=("TPS",))
    store.index.transition(ct_job, JobState.ROUTED, routes=[route])
    geometry = SliceGeometry(
        positions=np.array([[0.0, 0.0, 2.0 * k] for k in range(3)]),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        row_spacing=1.0,
        col_spacing=1.0,
        rows=8,
        columns=8,
    )
    store.keep_geometry(ct_job, geometry)
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    labels[:, 2:6, 2:6] = 1
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(store.job_dir(ct_job) / labels_file(0)))
    rt_job = _series(store, 2, "RTSTRUCT")
    _approved_set(store.spool.root / "2.dcm", geometry)
    linked = replace(store.index.job(rt_job).detail, linked_to=ct_job)
    store.index.transition(rt_job, JobState.ASSESSING, reason="linked", detail=linked)
    runner = InferenceRunner(60, device="cpu", log_level=None)  # never started
    worker = Worker(cfg, store, registry_for(cfg), runner, rules=lambda: None)

    worker.assess(store.index.job(rt_job))
    done = store.index.job(rt_job)
    assert done.state is JobState.UNROUTED
    assert done.reason == (
        f"clinician's structure set, linked to job {ct_job}; no agreement figures: comparing the approved set "
        "ran past agreement.timeout_s (1e-09 s) before External: no figures for this set"
    )
    assert store.index.agreement(ct_job=ct_job) == []

    within = cfg.model_copy(update={"agreement": cfg.agreement.model_copy(update={"timeout_s": 600})})
    assert (
        assess_structure_set(within, store, registry_for(cfg), rt_job, ct_job) == "; agreement figures of 1 structures"
    )

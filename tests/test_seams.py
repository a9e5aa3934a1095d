"""The typed hand-offs between stages: the series header routing reads, as receive indexed it."""

from __future__ import annotations

from pathlib import Path

import pydicom

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.route import SeriesFacts
from ie_gateway.store import SeriesHeader, Store, header_values


def test_the_header_receive_indexes_is_the_series_header_routing_reads(tmp_path: Path) -> None:
    [path] = write_ct_series(make_phantom(3, slices=1, size=32), tmp_path / "ct", seed=3)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.ImagesInAcquisition = 1
    header = header_values(ds)
    assert isinstance(header, SeriesHeader)
    assert (header.modality, header.images_in_acquisition, header["BodyPartExamined"]) == ("CT", 1, "CHEST")
    assert "PixelData" not in header

    store = Store(tmp_path / "var")
    job_id, _ = store.index.add_instance(
        sop_uid="1.2.3.1",
        sop_class=str(ds.SOPClassUID),
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2.3",
        series_uid="1.2.3.0",
        path="ct.dcm",
        size=1,
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
        header=lambda: header,
    )
    job = store.index.job(job_id)
    assert isinstance(job.header, SeriesHeader) and job.header == header
    assert store.complete_quiet(stable_after_s=3600) == [job_id]  # ImagesInAcquisition: every instance is here
    facts = SeriesFacts(job.header, job.calling_ae, job.called_ae, job.instances)
    assert facts.header.get("Modality") == "CT"


def test_an_instance_whose_header_cannot_be_decoded_has_an_empty_one() -> None:
    assert (SeriesHeader().modality, SeriesHeader().images_in_acquisition, len(SeriesHeader())) == ("", None, 0)

"""Benchmark: C-STORE against STOW-RS, sending and receiving, in one run.

Usage (Orthanc and storescp listen on every interface: run in a private network namespace):
    unshare -n sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python bench/deliver.py
        [--slices 200] [--size 512] [--repeat 3]

1. Delivery: the same RT-STRUCT and SEG of a synthetic thorax CT, delivered by the node's own
   outbox (``Sender``) to one Orthanc, by C-STORE (one association) and by STOW-RS (Orthanc's
   DICOMweb plugin, one request per file), alternating. The goal: STOW-RS within 1.5x of
   C-STORE for the same bytes.
2. Receipt: the CT series sent to `ie-gateway serve` by dcmtk's storescu (TCP_NODELAY) and by
   dicomweb-client's STOW-RS to `POST /dicomweb/studies` (20 instances per request), each run
   with fresh UIDs so nothing is a duplicate.
Prints median seconds, MiB/s and the ratios. These machines are noisy (±10-15 %): compare
within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomweb_client.api import DICOMwebClient

from ie_gateway.config import DeliverySettings, Destination
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom, write_ct_series
from ie_gateway.send import Sender
from ie_gateway.store import Arrival, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.write import ModelInfo, StructureInfo, build_rtstruct, build_seg, new_output_uids
from tests.peers import DCMTK_ENV, Node, Orthanc, wait_until

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
TOKEN = "bench-token"
BATCH = 20
MODEL = ModelInfo("demo-thorax", "1", node="IE_GATEWAY")


def median_s(repeat: int, run: Callable[[int], None]) -> float:
    times = []
    for k in range(repeat):
        started = time.perf_counter()
        run(k)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def outputs(paths: list[Path], labels: object, folder: Path) -> list[tuple[Path, str, str]]:
    """The RT-STRUCT and SEG of the phantom's labels: (file, SOP UID, SOP class)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    structures = [
        StructureInfo(i, name, (200, 100, 50), "EXTERNAL" if name == "External" else "ORGAN", name == "External")
        for i, name in enumerate(STRUCTURES, start=1)
    ]
    out = []
    for stem, build in (("rtstruct", build_rtstruct), ("seg", build_seg)):
        uids = new_output_uids()
        ds = build(headers, labels, structures, MODEL, uids)  # type: ignore[operator]
        path = folder / f"{stem}.dcm"
        ds.save_as(path, enforce_file_format=True) if stem == "rtstruct" else ds.save_as(path)
        out.append((path, uids.sop_uid, str(ds.SOPClassUID)))
    return out


def bench_delivery(args: argparse.Namespace, work: Path, paths: list[Path], labels: object) -> tuple[float, float, int]:
    tps = Orthanc(work / "orthanc")
    settings = json.loads(tps.config.read_text())
    settings.update({"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    tps.config.write_text(json.dumps(settings))
    tps.start()
    try:
        store = Store(work / "var")
        results = store.results
        files = outputs(paths, labels, results)
        size = sum(p.stat().st_size for p, _, _ in files)
        arrival = Arrival(
            generate_uid(),
            "1.2.840.10008.5.1.4.1.1.2",
            generate_uid(),
            generate_uid(),
            "1.2.840.10008.1.2.1",
            "PACS",
            "IE_GATEWAY",
        )
        job_id, _, _ = store.accept(arrival, (b"DICM",), lambda: {"Modality": "CT"})
        outbox = Outbox(store.index)
        destinations = {}
        for k in range(args.repeat):
            destinations[f"DIMSE{k}"] = Destination(ae_title=tps.ae_title, host="127.0.0.1", port=tps.dicom_port)
            destinations[f"WEB{k}"] = Destination(
                protocol="dicomweb", url=f"http://127.0.0.1:{tps.http_port}/dicom-web"
            )
        sender = Sender(destinations, DeliverySettings(), outbox, results)

        def deliver(name: str) -> None:
            for path, sop, sop_class in files:
                outbox.enqueue(job_id, name, str(path.relative_to(results)), sop, sop_class)
            delivered = sum(f.result() for f in sender.deliver_due())
            assert delivered == len(files), f"{name}: {delivered} of {len(files)} delivered"

        dimse = median_s(args.repeat, lambda k: deliver(f"DIMSE{k}"))
        web = median_s(args.repeat, lambda k: deliver(f"WEB{k}"))
        sender.close()
        return dimse, web, size
    finally:
        tps.stop()


def fresh_copies(paths: list[Path], folder: Path) -> list[Path]:
    """The series under new study/series/instance UIDs, so the node stores every instance."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


def bench_receipt(args: argparse.Namespace, work: Path, paths: list[Path]) -> tuple[float, float]:
    node = Node(
        work / "node",
        settings={"http": {"stow_callers": [{"name": "PACS_WEB", "token": "env:STOW_TOKEN"}]}},
        env={"STOW_TOKEN": TOKEN},
    ).start()
    try:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        web = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicomweb", session=session)
        web.set_http_retry_params(retry=False)
        runs = [fresh_copies(paths, work / f"copy{k}") for k in range(2 * args.repeat)]

        def storescu(k: int) -> None:
            subprocess.run(
                [
                    "/usr/bin/storescu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "IE_GATEWAY",
                    "-R",
                    "127.0.0.1",
                    str(node.port),
                    *map(str, runs[2 * k]),
                ],
                check=True,
                env=DCMTK_ENV,
                capture_output=True,
            )

        def stow(k: int) -> None:
            files = runs[2 * k + 1]
            for start in range(0, len(files), BATCH):
                web.store_instances([pydicom.dcmread(p) for p in files[start : start + BATCH]])

        dimse = median_s(args.repeat, storescu)
        dicomweb = median_s(args.repeat, stow)
        wait_until(
            lambda: sum(j["instances"] for j in node.jobs()) >= 2 * args.repeat * len(paths),
            60,
            what="every instance indexed",
        )
        return dimse, dicomweb
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_phantom(3, slices=args.slices, size=args.size)
        paths = write_ct_series(phantom, work / "ct", seed=3)
        ct_mib = sum(p.stat().st_size for p in paths) / 2**20
        dimse, web, size = bench_delivery(args, work, paths, phantom.labels)
        mib = size / 2**20
        print(f"Delivery of RT-STRUCT + SEG ({mib:.1f} MiB) to Orthanc, median of {args.repeat}:")
        print(f"  C-STORE  {dimse:6.2f} s  {mib / dimse:6.1f} MiB/s")
        print(f"  STOW-RS  {web:6.2f} s  {mib / web:6.1f} MiB/s   STOW-RS / C-STORE {web / dimse:.2f}x (goal <= 1.5x)")
        dimse_in, web_in = bench_receipt(args, work, paths)
        print(f"Receipt of a {args.slices}-slice CT ({ct_mib:.1f} MiB) by the node, median of {args.repeat}:")
        print(f"  storescu  {dimse_in:6.2f} s  {ct_mib / dimse_in:6.1f} MiB/s")
        print(
            f"  STOW-RS   {web_in:6.2f} s  {ct_mib / web_in:6.1f} MiB/s   STOW-RS / storescu {web_in / dimse_in:.2f}x"
        )


if __name__ == "__main__":
    main()

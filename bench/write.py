"""Benchmark: building, saving and validating the RT-STRUCT and SEG of one thorax CT.

Usage: .venv/bin/python bench/write.py [--slices 200] [--size 512] [--repeat 3]

The phantom's own label map stands in for the model output; the CT headers are made in memory
(no pixel data), as the worker reads them with stop_before_pixels. The peer is highdicom's plain
label-map Segmentation of the same labels (exclusive segments, no hole filling): build_seg's
ratio to it is the price of overlapping per-structure masks. RT-STRUCT has no peer here
(highdicom has no RT-STRUCT writer). The LABELMAP SEG (a route's ``seg_encoding: labelmap``) is
timed and its file size printed against the BINARY SEG's. Times are the median of --repeat runs,
wall and CPU seconds;
these shared machines vary by 10-15 %, so read the ratios.

"RT-STRUCT as the worker makes it" is the planner's path: the structures' masks made once,
the RT-STRUCT built, saved, and validated against those masks. Its goal is 1 s of CPU; before
the contours were stored encoded and validated per slice (commit 1a01992) the same steps took
5.5 s of CPU here (build 2.72 + save 0.15 + validate 2.63, median of 3). At 42b0aa2 they took
1.59 s (rows: build_rtstruct 0.68, save 0.08, validate_rtstruct 0.71); with contours traced
from the boundary only, holes filled by labelling several slices per call, and validation
parsing each ROI's ContourData once and taking the Dice from row toggles, 0.99 s (0.42, 0.09,
0.47). CPU seconds on a 2-core machine running another test suite, each the median of three
runs of --repeat 3, old and new alternating; build_rtstruct and validate_rtstruct (file) each
make the masks themselves, so their sum exceeds the worker's line.

Since the per-structure work runs on helper threads (masks, contours, Dice: one structure per
thread), wall time is below CPU time on a machine with idle cores. On a 2-core VM about half as
fast as the one above (c8383a0's code gives 2.11 s of CPU there), median of 5: the worker's
line 1.79 s wall for 2.09 s CPU; build_rtstruct 0.79 s wall for 1.06 s CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.write import (
    ModelInfo,
    StructureInfo,
    build_rtstruct,
    build_seg,
    make_masks,
    new_output_uids,
    validate_rtstruct,
    validate_seg,
)
from ie_gateway.write.seg import segment_description

MODEL = ModelInfo("demo-thorax", "1")
#: CPU seconds of build + save + validate of the RT-STRUCT at commit 1a01992, measured here.
BEFORE_CPU_S = 5.50
GOAL_CPU_S = 1.0
STRUCTURES = (
    StructureInfo(1, "External", (0, 200, 0), "EXTERNAL", fill_holes=True),
    StructureInfo(2, "Lung_L", (0, 128, 255), "ORGAN", fill_holes=False),
    StructureInfo(3, "Lung_R", (255, 128, 0), "ORGAN", fill_holes=False),
    StructureInfo(4, "Heart", (255, 0, 0), "ORGAN", fill_holes=False),
    StructureInfo(5, "SpinalCord", (255, 255, 0), "ORGAN", fill_holes=False),
)


def timed(repeat: int, run: Callable[[], object]) -> tuple[float, float]:
    """Median wall and CPU seconds of ``run`` over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def highdicom_labelmap_seg(headers: list[pydicom.Dataset], labels: np.ndarray) -> object:
    """The peer: highdicom's Segmentation of the label map as it is."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MODEL.name, version=MODEL.version, family=codes.cid7162.ArtificialIntelligence
    )
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(n, s, algorithm) for n, s in enumerate(STRUCTURES, start=1)],
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="bench",
        manufacturer_model_name="bench",
        software_versions="bench",
        device_serial_number="bench",
        omit_empty_frames=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    phantom = make_phantom(1, slices=args.slices, size=args.size)
    labels = phantom.labels
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_ct_series(phantom, folder / "ct", seed=1)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        rt_uids, seg_uids = new_output_uids(), new_output_uids()
        rt_path, seg_path = folder / "rtstruct.dcm", folder / "seg.dcm"
        rows: list[tuple[str, tuple[float, float]]] = []

        rtstruct = build_rtstruct(headers, labels, STRUCTURES, MODEL, rt_uids)  # warm imports

        def worker_rtstruct() -> None:
            masks = make_masks(labels, STRUCTURES)
            ds = build_rtstruct(headers, labels, STRUCTURES, MODEL, rt_uids, masks=masks)
            ds.save_as(rt_path, enforce_file_format=True)
            validate_rtstruct(rt_path, headers, labels, STRUCTURES, rt_uids, masks=masks)

        rows.append(("RT-STRUCT as the worker makes it", timed(args.repeat, worker_rtstruct)))
        rows.append(
            (
                "build_rtstruct",
                timed(args.repeat, lambda: build_rtstruct(headers, labels, STRUCTURES, MODEL, rt_uids)),
            )
        )
        rows.append(
            (
                "save rtstruct",
                timed(args.repeat, lambda: rtstruct.save_as(rt_path, enforce_file_format=True)),
            )
        )
        rows.append(
            (
                "validate_rtstruct (file)",
                timed(
                    args.repeat,
                    lambda: validate_rtstruct(rt_path, headers, labels, STRUCTURES, rt_uids),
                ),
            )
        )
        seg = build_seg(headers, labels, STRUCTURES, MODEL, seg_uids)
        rows.append(
            (
                "build_seg",
                timed(args.repeat, lambda: build_seg(headers, labels, STRUCTURES, MODEL, seg_uids)),
            )
        )
        rows.append(
            (
                "peer: highdicom label-map SEG",
                timed(args.repeat, lambda: highdicom_labelmap_seg(headers, labels)),
            )
        )
        rows.append(("save seg", timed(args.repeat, lambda: seg.save_as(seg_path))))
        rows.append(
            (
                "validate_seg (file)",
                timed(
                    args.repeat,
                    lambda: validate_seg(seg_path, headers, labels, STRUCTURES, seg_uids),
                ),
            )
        )

        labelmap_path = folder / "seg-labelmap.dcm"
        labelmap = build_seg(headers, labels, STRUCTURES, MODEL, seg_uids, encoding="labelmap")
        rows.append(
            (
                "build_seg LABELMAP (RLE)",
                timed(
                    args.repeat,
                    lambda: build_seg(headers, labels, STRUCTURES, MODEL, seg_uids, encoding="labelmap"),
                ),
            )
        )
        rows.append(("save seg LABELMAP", timed(args.repeat, lambda: labelmap.save_as(labelmap_path))))

        contours = sum(len(r.get("ContourSequence", [])) for r in rtstruct.ROIContourSequence)
        print(
            f"CT {args.slices} x {args.size}², {len(STRUCTURES)} structures, "
            f"{contours} contours, RT-STRUCT {rt_path.stat().st_size / 2**20:.1f} MiB, "
            f"SEG {seg_path.stat().st_size / 2**20:.1f} MiB, median of {args.repeat}"
        )
        for name, (wall, cpu) in rows:
            print(f"  {name:32s} {wall:6.2f} s wall  {cpu:6.2f} s CPU")
        named = dict(rows)
        seg_wall, peer_wall = named["build_seg"][0], named["peer: highdicom label-map SEG"][0]
        print(f"  build_seg / highdicom label-map SEG: {seg_wall / peer_wall:.2f}x")
        binary_b, labelmap_b = seg_path.stat().st_size, labelmap_path.stat().st_size
        print(
            f"  SEG size: BINARY {binary_b / 2**20:.2f} MiB, LABELMAP (RLE) {labelmap_b / 2**20:.2f} MiB, "
            f"ratio {labelmap_b / binary_b:.3f}"
        )
        worker_cpu = named["RT-STRUCT as the worker makes it"][1]
        print(
            f"  RT-STRUCT as the worker makes it: {worker_cpu:.2f} s CPU, goal {GOAL_CPU_S:.1f} s, "
            f"{BEFORE_CPU_S / worker_cpu:.1f}x faster than at 1a01992 ({BEFORE_CPU_S:.2f} s)"
        )


if __name__ == "__main__":
    main()

"""Benchmark: a commissioning run with the CPU demo model, in cases per hour, and the node's own
time per case beyond inference (goal <= 3 s).

Usage: .venv/bin/python bench/commission.py [--cases 3] [--slices 100] [--size 512] [--device cpu]

Phantom cases are made in a temporary folder, each with its true structures as the approved
set; ``ie_gateway.commission.commission`` runs them as `ie-gateway commission` does. Per case the
run records the volume stage, the inference child's time and the total; "the node's own time"
is the total less inference: reading and checking the series, the plausibility gate, building
and validating the RT-STRUCT, rasterising both structure sets and the agreement figures. The
peer in the same run is inference itself: the ratio says how much the node adds to the model.
The report (plots, worst-case pictures, PDF) is timed once for the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from ie_gateway.commission import commission
from ie_gateway.config import load_config
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom, write_ct_series
from ie_gateway.write.common import ModelInfo, OutputUIDs, StructureInfo
from ie_gateway.write.rtstruct import build_rtstruct

REPO = Path(__file__).resolve().parent.parent
GOAL_NODE_S = 3.0


def make_cases(folder: Path, count: int, slices: int, size: int) -> None:
    structures = [
        StructureInfo(i, name, (200, 100, 0), "EXTERNAL" if i == 1 else "ORGAN", fill_holes=i == 1)
        for i, name in enumerate(STRUCTURES, start=1)
    ]
    for seed in range(100, 100 + count):
        case = folder / f"case-{seed}"
        phantom = make_phantom(seed, slices=slices, size=size, pixel_mm=500.0 / size, slice_mm=2.5)
        ct = write_ct_series(phantom, case, seed=seed)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
        ds = build_rtstruct(
            headers, phantom.labels, structures, ModelInfo("truth", "1"), OutputUIDs(generate_uid(), generate_uid())
        )
        ds.ApprovalStatus = "APPROVED"
        ds.save_as(case / "approved.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-commission-") as tmp:
        root = Path(tmp)
        make_cases(root / "cases", args.cases, args.slices, args.size)
        (root / "routing.yaml").write_text("rules: []\n")
        (root / "gateway.yaml").write_text(
            json.dumps(
                {
                    "storage": {"root": "var"},
                    "routing_file": "routing.yaml",
                    "models_dir": str(REPO / "models"),
                    "inference": {"device": args.device, "timeout_s": 3600},
                    # the demo package's publisher, as the example config trusts it
                    "trusted_keys": [{"name": "demo", "public_key": str(REPO / "keys" / "demo-only-publisher.pub")}],
                }
            )
        )
        cfg = load_config(root / "gateway.yaml")
        started = time.monotonic()
        outcome = commission(cfg, "demo-thorax", root / "cases", root / "report", print)
        wall = time.monotonic() - started
    seconds = [r.seconds for r in outcome.results if r.done]
    total = statistics.median(s["total"] for s in seconds)
    inference = statistics.median(s["inference"] for s in seconds)
    node = statistics.median(s["node"] for s in seconds)
    volume = statistics.median(s["volume"] for s in seconds)
    print(
        f"\n{len(seconds)} cases of {args.slices} x {args.size}^2 on {args.device}, median per case: "
        f"total {total:.1f} s, inference {inference:.1f} s, node's own {node:.2f} s (volume {volume:.2f} s)"
    )
    phases = {p: statistics.median(s[p] for s in seconds) for p in ("check", "rtstruct", "agreement")}
    print("of which (median s): " + ", ".join(f"{p} {v:.2f}" for p, v in phases.items()))
    print(f"cases per hour: {3600 / total:.0f} (whole run with report: {3600 * len(seconds) / wall:.0f})")
    print(
        f"node's own time / inference: {node / inference:.2f}; goal {GOAL_NODE_S:g} s: "
        f"{'met' if node <= GOAL_NODE_S else 'not met'}"
    )


if __name__ == "__main__":
    main()

"""Benchmark: from the last CT instance acknowledged to the RT-STRUCT stored at the TPS.

Usage: .venv/bin/python bench/e2e.py [--slices 200] [--repeat 1] [--stable-after 2]

A node (the shipped demo model, CPU) and Orthanc as the TPS run on loopback; storescu sends a
synthetic 512² CT. The time after the last C-STORE response until Orthanc holds the RT-STRUCT
is split, from the node's own log, into the quiet period (stable_after_s), the model's compute
(the inference runner's resample, windows, folds, post-processing and resample back) and the
rest: our overhead (routing, volume load, the plausibility checks, writing and validating the
RT-STRUCT, delivery; the SEG and the QA picture are made after the RT-STRUCT is queued). From
the label map on, the RT-STRUCT's path is split into the masks and checks, its build and
validation, and the delivery. The peer for scale is the storescu send of the 200 CT instances.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ie_gateway.demo.phantoms import make_phantom, write_ct_series  # noqa: E402
from tests.peers import DCMTK_ENV, REPO, Node, Orthanc, wait_until  # noqa: E402


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def one_run(work: Path, series: Path, stable_after: float) -> dict[str, float]:
    tps = Orthanc(work / "tps").start()
    node = Node(work / "node", settings={
        "series": {"stable_after_s": stable_after, "sweep_every_s": 0.2},
        "models_dir": str(REPO / "models"),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
        "delivery": {"every_s": 1.0},
    }, rules={"rules": [{"name": "thorax", "match": {"Modality": "CT"}, "model": "demo-thorax",
                         "outputs": ["rtstruct", "seg"], "send_to": ["TPS"],
                         # a result failing its checks is still sent (marked), so the run ends
                         "review": "flag"}]}).start()
    try:
        started = time.time()
        subprocess.run(["storescu", "-aec", "IE_GATEWAY", "-R", "+sd", "+r", "127.0.0.1", str(node.port),
                        str(series)], check=True, env=DCMTK_ENV, capture_output=True)
        acked = time.time()

        def rtstruct_at_tps() -> bool:
            return bool(tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}}))

        wait_until(rtstruct_at_tps, 1800, every=0.05, what="the RT-STRUCT at Orthanc")
        stored = time.time()
        events = node.log_events()
        complete = next(_ts(e) for e in events if e["event"] == "series complete")
        [job] = node.status()
        timings = job["timings_s"]
        stages = {e["stage"]: e["seconds"] for e in events if e["event"] == "stage done"}
        inferred = next(_ts(e) for e in events if e["event"] == "inferred")
        checked = next(e for e in events if e["event"] == "result checked")
        queued = next(e for e in events if e["event"] == "output queued" and e["kind"] == "rtstruct")
        if job.get("review"):
            print(f"  (the result failed its checks, sent marked: {job['review']['reasons']})")
        model = float(timings["total"])  # the runner's resample + windows + resample back + post-processing
        total = stored - acked
        quiet = complete - acked
        return {"send_s": acked - started, "total_s": total, "quiet_s": quiet, "model_s": model,
                "overhead_s": total - quiet - model, **{f"stage_{k}_s": v for k, v in stages.items()},
                "label_map_to_rtstruct_stored_s": stored - inferred,
                "  of which: masks + checks_s": checked["seconds"],
                "  rtstruct built + validated_s": queued["seconds"] - checked["seconds"],
                "  queued -> stored at TPS_s": stored - _ts(queued)}
    finally:
        node.stop()
        tps.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--stable-after", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        series = root / "ct"
        write_ct_series(make_phantom(321, slices=args.slices), series, seed=321)
        runs = [one_run(root / f"run{i}", series, args.stable_after) for i in range(args.repeat)]
    keys = runs[0].keys()
    print(f"{args.slices} x 512x512 CT, demo-thorax on the CPU, median of {args.repeat}:")
    for key in keys:
        print(f"  {key:<22} {statistics.median(r[key] for r in runs):7.2f}")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"overhead / send time (storescu -> node, {args.slices} instances): {med['overhead_s'] / med['send_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark: from the last CT instance acknowledged to the RT-STRUCT stored at the TPS.

Usage: .venv/bin/python bench/e2e.py [--slices 200] [--repeat 1] [--stable-after 2] [--series 1]
                                     [--serial]

A node (the shipped demo model, CPU) and Orthanc as the TPS run on loopback; storescu sends a
synthetic 512² CT. The time after the last C-STORE response until Orthanc holds the RT-STRUCT
is split, from the node's own log, into:

- the quiet period: ack → "series complete" as measured (stable_after_s plus the sweep's tick);
- the infer stage as the worker timed it ("stage done", stage infer): the model's compute
  (the runner's ``timings_s.total``: resample, windows, folds, post-processing, resample back)
  plus the child's own cost around it (reading the stored CT, writing the label map, the
  round trip to the child);
- the rest, the node's own time: routing, preparing the volume (load, check, store) when it
  did not overlap another job's inference, the write stage up to the RT-STRUCT and delivery.

Two "overhead" figures are printed because they answer different questions: ``overhead_s`` is
everything but the quiet period and the infer stage (the node's own time on the path), and
``overhead_vs_model_s`` is everything but the quiet period and the model's compute (what a
model run by itself would not cost). From the label map on, the RT-STRUCT's path is split into
the masks and checks, its build and validation, the wait in the outbox and the C-STORE.

``--series N``: N series (different patients) sent at once by N storescu processes, as N
scanners would; the figure is last ack → last RT-STRUCT at the TPS against the sum of the N
infer stages (a worker that runs one stage at a time, ``--serial``, adds every volume load and
every write to that sum; the pipelined worker hides them behind the next job's inference).
The peer for scale is the storescu send of the CT instances.
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

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from tests.peers import DCMTK_ENV, REPO, Node, Orthanc, wait_until


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _send_all(port: int, folders: list[Path]) -> tuple[float, float]:
    """Send each folder by its own storescu, all at once; (start, last ack)."""
    started = time.time()
    procs = [
        subprocess.Popen(["/usr/bin/storescu", "-aec", "IE_GATEWAY", "-R", "+sd", "+r", "127.0.0.1", str(port),
                          str(folder)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for folder in folders
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return started, time.time()


def _path_of_one(events: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, float]:
    """Label map → RT-STRUCT C-STORE of one job, from its log lines."""
    mine = [e for e in events if e.get("job") == job["id"]]
    inferred = next(_ts(e) for e in mine if e["event"] == "inferred")
    checked = next(_ts(e) for e in mine if e["event"] == "result checked")
    queued = next(_ts(e) for e in mine if e["event"] == "output queued" and e["kind"] == "rtstruct")
    delivered = min(_ts(e) for e in mine if e["event"] == "delivered")  # the RT-STRUCT is queued first
    return {
        "label_map_to_rtstruct_cstore_s": delivered - inferred,
        "  write claimed, headers, masks + checks_s": checked - inferred,
        "  rtstruct built + validated + queued_s": queued - checked,
        "  queued -> C-STORE done_s": delivered - queued,
    }


def one_run(work: Path, folders: list[Path], stable_after: float, serial: bool) -> dict[str, float]:
    tps = Orthanc(work / "tps").start()
    node = Node(work / "node", settings={
        "series": {"stable_after_s": stable_after, "sweep_every_s": 0.2},
        "models_dir": str(REPO / "models"),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
        "delivery": {"every_s": 1.0},
        "worker": {"pipeline": not serial},
    }, rules={"rules": [{"name": "thorax", "match": {"Modality": "CT"}, "model": "demo-thorax",
                         "outputs": ["rtstruct", "seg"], "send_to": ["TPS"],
                         # a result failing its checks is still sent (marked), so the run ends
                         "review": "flag"}]}).start()
    try:
        started, acked = _send_all(node.port, folders)

        def rtstructs_at_tps() -> bool:
            found = tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
            return len(found) >= len(folders)

        wait_until(rtstructs_at_tps, 3600, every=0.05, what="the RT-STRUCTs at Orthanc")
        stored = time.time()

        def delivered_logged() -> list[dict[str, Any]] | None:  # the node logs a C-STORE after its response
            events = node.log_events()
            done = {e.get("job") for e in events if e["event"] == "delivered"}
            started = {e.get("job") for e in events if e["event"] == "inferred"}
            return events if len(started) >= len(folders) and started <= done else None

        events = wait_until(delivered_logged, 60, every=0.2, what="the node's delivered lines")
        complete = max(_ts(e) for e in events if e["event"] == "series complete")
        jobs = node.status()
        for job in jobs:
            if job.get("review"):
                print(f"  (job {job['id']} failed its checks, sent marked: {job['review']['reasons']})")
        stage_s: dict[str, float] = {}
        for e in events:
            if e["event"] == "stage done":
                stage_s[e["stage"]] = stage_s.get(e["stage"], 0.0) + e["seconds"]
        infer_sum = stage_s["infer"]
        model_sum = sum(float(job["timings_s"]["total"]) for job in jobs)
        total = stored - acked
        quiet = complete - acked  # the last series' quiet period, as the node measured it
        figures = {"send_s": acked - started, "total_s": total, "quiet_s": quiet,
                   "infer_stages_sum_s": infer_sum, "model_compute_sum_s": model_sum,
                   "overhead_s": total - quiet - infer_sum, "overhead_vs_model_s": total - quiet - model_sum,
                   "total / infer_sum": total / infer_sum,
                   "(total - quiet) / infer_sum": (total - quiet) / infer_sum,
                   **{f"stages_{k}_s (sum over jobs)": v for k, v in stage_s.items()}}
        paths = [_path_of_one(events, job) for job in jobs]
        figures.update({k: max(p[k] for p in paths) for k in paths[0]})  # the slowest job's
        key = "label_map_to_rtstruct_cstore_s"
        figures[f"{key} (median job)"] = statistics.median(p[key] for p in paths)
        return figures
    finally:
        node.stop()
        tps.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--stable-after", type=float, default=2.0)
    parser.add_argument("--series", type=int, default=1, help="series sent at once, one storescu each")
    parser.add_argument("--serial", action="store_true", help="worker.pipeline: false (one stage at a time)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        folders = []
        for n in range(args.series):
            folder = root / f"ct{n}"
            write_ct_series(make_phantom(321 + n, slices=args.slices), folder, seed=321 + n,
                            patient_id=f"PH{n:04d}")
            folders.append(folder)
        runs = [one_run(root / f"run{i}", folders, args.stable_after, args.serial) for i in range(args.repeat)]
    keys = runs[0].keys()
    worker = "one stage at a time" if args.serial else "pipelined"
    print(f"{args.series} x {args.slices} x 512x512 CT at once, demo-thorax on the CPU, {worker} worker, "
          f"median of {args.repeat}:")
    for key in keys:  # label map -> RT-STRUCT: the slowest job's, then the median job's
        print(f"  {key:<48} {statistics.median(r[key] for r in runs):8.2f}")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"overhead / send time (storescu -> node): {med['overhead_s'] / med['send_s']:.2f}x")


if __name__ == "__main__":
    main()

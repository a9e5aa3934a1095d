"""Benchmark: memory and C-ECHO latency of the node under a pre-association flood, against Orthanc.

Usage: .venv/bin/python bench/flood.py [--peers 20] [--mib 40] [--seconds 10] [--instance-mib 256]

Each server is started fresh on loopback. (1) PEERS raw sockets each announce a ~4 GiB
A-ASSOCIATE-RQ and stream up to MIB MiB into it, connecting again when hung up on, for SECONDS,
while dcmtk's echoscu measures C-ECHO round trips. (2) dcmtk's storescu sends one Enhanced CT of
INSTANCE_MIB MiB. For each, the server's peak resident memory over its idle size (VmHWM after
resetting it, minus VmRSS before) is printed, with the node's figures beside Orthanc's.
Goals for the node: at most 100 MiB of growth in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.flood import big_instance, memory_mb, reset_peak
from tests.peers import DCMTK_ENV, REPO, Node, Orthanc


@contextmanager
def node(work: Path) -> Iterator[tuple[int, int]]:
    server = Node(work, settings={"series": {"stable_after_s": 3600}}).start()
    try:
        assert server.proc is not None
        yield server.port, server.proc.pid
    finally:
        server.stop()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, int]]:
    server = Orthanc(work, ae_title="IE_GATEWAY").start()
    try:
        assert server.proc is not None
        yield server.dicom_port, server.proc.pid
    finally:
        server.stop()


SERVERS: dict[str, Callable[[Path], AbstractContextManager[tuple[int, int]]]] = {"ie_gateway": node, "orthanc": orthanc}


def echo_s(port: int) -> float | None:
    """Seconds of one echoscu run (association, C-ECHO, release), None if it failed."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "IE_GATEWAY", "127.0.0.1", str(port)],
        check=False,
        capture_output=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    return time.perf_counter() - started if result.returncode == 0 else None


def under_flood(port: int, pid: int, peers: int, mib: int, seconds: float) -> dict[str, object]:
    idle = memory_mb(pid)["VmRSS"]
    quiet = [echo_s(port) for _ in range(5)]
    reset_peak(pid)
    flood = subprocess.Popen(
        [sys.executable, "-m", "tests.flood", str(port), str(peers), str(mib), str(seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    echoes = []
    while flood.poll() is None:
        echoes.append(echo_s(port))
    report = json.loads(flood.communicate()[0])
    done = [e for e in echoes if e is not None]
    return {
        "idle_mib": round(idle),
        "peak_growth_mib": round(memory_mb(pid)["VmHWM"] - idle),
        "echo_quiet_ms": round(1000 * statistics.median([e for e in quiet if e is not None])),
        "echo_median_ms": round(1000 * statistics.median(done)) if done else None,
        "echo_max_ms": round(1000 * max(done)) if done else None,
        "echo_failed": len(echoes) - len(done),
        **report,
    }


def one_instance(port: int, pid: int, path: Path) -> dict[str, object]:
    idle = memory_mb(pid)["VmRSS"]
    reset_peak(pid)
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "IE_GATEWAY", "-R", "127.0.0.1", str(port), str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=600,
    )
    return {
        "sent": result.returncode == 0,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_growth_mib": round(memory_mb(pid)["VmHWM"] - idle),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--mib", type=int, default=40, help="MiB each flooding connection streams at most")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--instance-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        root = Path(tmp)
        path = big_instance(root, args.instance_mib)
        results = {}
        for name, server in SERVERS.items():
            with server(root / f"{name}-flood") as (port, pid):
                flood = under_flood(port, pid, args.peers, args.mib, args.seconds)
            with server(root / f"{name}-instance") as (port, pid):
                instance = one_instance(port, pid, path)
            results[name] = (flood, instance)
            print(f"{name:<10} flood:    {json.dumps(flood)}", flush=True)
            print(f"{name:<10} instance: {json.dumps(instance)}", flush=True)
    (node_flood, node_instance), (peer_flood, peer_instance) = results["ie_gateway"], results["orthanc"]
    print(f"\n{args.peers} peers x up to {args.mib} MiB for {args.seconds:g} s; one {args.instance_mib} MiB instance")
    print(
        f"flood peak growth: ie_gateway {node_flood['peak_growth_mib']} MiB, orthanc {peer_flood['peak_growth_mib']} MiB"
        f" (goal for the node: <= 100)"
    )
    print(
        f"C-ECHO under flood, median/max: ie_gateway {node_flood['echo_median_ms']}/{node_flood['echo_max_ms']} ms, "
        f"orthanc {peer_flood['echo_median_ms']}/{peer_flood['echo_max_ms']} ms"
    )
    print(
        f"instance peak growth: ie_gateway {node_instance['peak_growth_mib']} MiB, "
        f"orthanc {peer_instance['peak_growth_mib']} MiB (goal for the node: <= 100)"
    )


if __name__ == "__main__":
    main()

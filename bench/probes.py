"""Benchmark: C-ECHO latency while load-balancer probes and silent connections hit the port.

Usage: .venv/bin/python bench/probes.py [--cycles 1000] [--seconds 10] [--silent 20]

Each target is started fresh on loopback: (a) `ie-gateway serve` with max_associations 8 and
acse_timeout_s 5 (its defaults), (b) dcmtk storescp --fork (a process per association), the
peer. First echoscu is timed on a quiet port, then while tests/probes.py holds ``--silent``
connections open without a word and opens-then-closes ``--cycles`` connections over
``--seconds``. Prints per target: echoes answered / tried, median, p95 and max seconds, the
ratio of loaded to quiet median, and the node's CPU seconds spent during the flood.
Run it in a network namespace (storescp listens on all interfaces):
  unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/probes.py'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import DCMTK_ENV, REPO, Node, free_port, port_open, wait_until


def echo(port: int) -> tuple[bool, float]:
    started = time.monotonic()
    result = subprocess.run(["/usr/bin/echoscu", "-to", "10", "-ta", "10", "-aet", "ECHOSCU", "-aec", "IE_GATEWAY",
                             "127.0.0.1", str(port)], capture_output=True, env=DCMTK_ENV, timeout=60, check=False)
    return result.returncode == 0, time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, port: int, pid: int | None, args: argparse.Namespace) -> dict[str, object]:
    quiet = [echo(port)[1] for _ in range(10)]
    cpu_before = cpu_seconds(pid) if pid else 0.0
    flood = subprocess.Popen([sys.executable, "-m", "tests.probes", str(port), str(args.cycles), str(args.seconds),
                              str(args.silent)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    loaded: list[tuple[bool, float]] = []
    while flood.poll() is None:
        loaded.append(echo(port))
    report = json.loads(flood.communicate(timeout=120)[0])
    cpu = cpu_seconds(pid) - cpu_before if pid else None
    times = sorted(t for ok, t in loaded if ok)
    q = statistics.median(quiet)
    row: dict[str, object] = {"target": name, "answered": f"{len(times)}/{len(loaded)}", "quiet_median_s": round(q, 3)}
    if times:
        m = statistics.median(times)
        row |= {"median_s": round(m, 3), "p95_s": round(times[int(0.95 * (len(times) - 1))], 3),
                "max_s": round(times[-1], 3), "loaded/quiet": round(m / q, 2)}
    row |= {"flood": report, "cpu_s_during_flood": None if cpu is None else round(cpu, 2)}
    return row


def node_target(tmp: Path) -> tuple[int, int | None, Callable[[], None]]:
    node = Node(tmp / "node").start()
    assert node.proc is not None
    return node.port, node.proc.pid, node.stop


def storescp_target(tmp: Path) -> tuple[int, int | None, Callable[[], None]]:
    port = free_port()
    (tmp / "scp").mkdir(parents=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "--fork", "-aet", "IE_GATEWAY", "-od", str(tmp / "scp"), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open(port), 30, what="storescp")

    def stop() -> None:
        proc.terminate()
        proc.wait()
    return port, None, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--silent", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, start in (("ie-gateway", node_target), ("storescp --fork", storescp_target)):
            port, pid, stop = start(Path(folder) / name.split()[0])
            try:
                print(json.dumps(measure(name, port, pid, args)), flush=True)
            finally:
                stop()


if __name__ == "__main__":
    main()

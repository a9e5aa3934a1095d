"""Benchmark: receive throughput of the node against dcmtk's storescp and Orthanc.

Usage: .venv/bin/python bench/receive.py [--repeat 5] [--senders 4] [--max-pdu-kb N ...]
       [--listener-processes N ...]

The same 200-slice 512² synthetic CT (≈100 MiB) is sent by dcmtk's storescu (TCP_NODELAY) to
(a) `ie-gateway serve` (durable: fsync + rename + index row before each answer),
(b) dcmtk storescp (writes files, no fsync), (c) Orthanc (SQLite index), (d) a bare pynetdicom
SCP (``bench/bare_scp.py``: the library's storage example, writes files, no fsync, no checks:
the node's ratio to it is the price of what the node adds), each started fresh on
loopback for every run so nothing is a duplicate. Then N senders at once, each with its own
series. The servers take turns within each repetition. Prints the median seconds and MiB/s
of each, and the node's ratios to the peers; ``--max-pdu-kb 16 256`` runs the node with each
maximum PDU length, to choose ``node.max_pdu_kb``; ``--listener-processes 1 4`` runs it with
each ``node.listener_processes``, and the bare pynetdicom SCP in as many processes as well.
These machines are noisy (±10-15 %): compare within one run. Every receiver's CPU per instance
(user + system, from /proc) is printed too, with the senders' own, since on a machine whose
cores other work shares it moves less than the wall-clock figures; and the most CPU per
instance Orthanc's pace leaves a receiver (every core busy for Orthanc's seconds, less the
senders' CPU): a receiver that needs more cannot keep that pace on this machine, however many
processes it spreads over.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_scp import LISTENING
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from tests.peers import DCMTK_ENV, Node, Orthanc, free_port, port_open, wait_until


class StoreSCP:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True)
        self.proc = subprocess.Popen(["storescp", "--fork", "-aet", "IE_GATEWAY", "-od", str(workdir), str(self.port)],
                                     env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 30, what="storescp")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def send(port: int, folders: list[Path], called: str, receiver: int, name: str) -> float:
    """Send each folder with its own storescu, all at once; seconds until the last finishes.
    The CPU seconds of the receiver (``receiver``: its pid) and of the senders during the send
    are kept in ``CPU`` under (``name``, number of senders)."""
    before = cpu_seconds(receiver)
    senders_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # only storescu is reaped meanwhile
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", called, "+sd", "+r", "-R",
                               "127.0.0.1", str(port), str(f)], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    seconds = time.perf_counter() - started
    after = cpu_seconds(receiver)
    senders_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault((name, len(folders)), []).append(Cpu(
        user=after[0] - before[0], system=after[1] - before[1],
        senders=(senders_after.ru_utime + senders_after.ru_stime)
        - (senders_before.ru_utime + senders_before.ru_stime)))
    return seconds


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of one run: the receiver's (user, system) and its senders' (storescu, all)."""

    user: float
    system: float
    senders: float


#: CPU seconds of each run, by (receiver name, senders)
CPU: dict[tuple[str, int], list[Cpu]] = {}


def children(pid: int) -> list[int]:
    """The process's children (/proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return found


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its children so far (/proc/PID/stat, clock
    ticks): the node's listener processes count too, and the children it has reaped (storescp
    forks one per association)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    user = (int(fields[11]) + int(fields[13])) / tick
    system = (int(fields[12]) + int(fields[14])) / tick
    for child in children(pid):
        try:
            child_user, child_system = cpu_seconds(child)
        except FileNotFoundError:  # it ended and was reaped just now: its CPU is its parent's now
            continue
        user, system = user + child_user, system + child_system
    return user, system


def run_node(work: Path, folders: list[Path], max_pdu_kb: int | None = None, processes: int | None = None,
             name: str = "ie_gateway") -> float:
    settings: dict[str, object] = {"series": {"stable_after_s": 3600}}
    node_settings: dict[str, int] = {}
    if max_pdu_kb is not None:
        node_settings["max_pdu_kb"] = max_pdu_kb
    if processes is not None:
        node_settings["listener_processes"] = processes
    if node_settings:
        settings["node"] = node_settings
    node = Node(work, settings=settings).start()
    try:
        assert node.proc is not None
        return send(node.port, folders, "IE_GATEWAY", node.proc.pid, name)
    finally:
        node.stop()


def bare_name(processes: int) -> str:
    """The bare pynetdicom SCP's name in the figures: ``pynetdicom``, ``pynetdicom×2``, ..."""
    return "pynetdicom" if processes == 1 else f"pynetdicom×{processes}"


def run_bare_pynetdicom(work: Path, folders: list[Path], processes: int = 1) -> float:
    """pynetdicom's storage example (bench/bare_scp.py), in ``processes`` processes on one port:
    the library's floor."""
    port = free_port()
    script = Path(__file__).with_name("bare_scp.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(work), "256", str(processes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    copies = [work] + [work / f"p{n}" for n in range(1, processes)]
    try:
        wait_until(lambda: all((c / LISTENING).exists() for c in copies), 30, what="bare pynetdicom SCP")
        return send(port, folders, "IE_GATEWAY", proc.pid, bare_name(processes))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def run_storescp(work: Path, folders: list[Path]) -> float:
    scp = StoreSCP(work)
    try:
        return send(scp.port, folders, "IE_GATEWAY", scp.proc.pid, "storescp")
    finally:
        scp.stop()


def run_orthanc(work: Path, folders: list[Path]) -> float:
    server = Orthanc(work, ae_title="IE_GATEWAY").start()
    try:
        assert server.proc is not None
        return send(server.dicom_port, folders, "IE_GATEWAY", server.proc.pid, "orthanc")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--max-pdu-kb", type=int, nargs="*", default=[],
                        help="run the node once per value of node.max_pdu_kb (default: its configured one)")
    parser.add_argument("--listener-processes", type=int, nargs="*", default=[],
                        help="run the node once per value of node.listener_processes (default: its configured one)")
    args = parser.parse_args()
    nodes: dict[str, Callable[[Path, list[Path]], float]] = {
        f"ie_gateway@{kb}k": partial(run_node, max_pdu_kb=kb, name=f"ie_gateway@{kb}k") for kb in args.max_pdu_kb
    }
    nodes.update({
        f"ie_gateway×{n}": partial(run_node, processes=n, name=f"ie_gateway×{n}") for n in args.listener_processes
    })
    nodes = nodes or {"ie_gateway": run_node}
    bares: dict[str, Callable[[Path, list[Path]], float]] = {
        bare_name(n): partial(run_bare_pynetdicom, processes=n) for n in sorted({1, *args.listener_processes})
    }
    peers = {**nodes, **bares, "storescp": run_storescp, "orthanc": run_orthanc}
    counts = sorted({1, args.senders})
    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp:
        root = Path(tmp)
        folders = []
        for seed in range(max(args.senders, 1)):
            folder = root / f"series{seed}"
            write_ct_series(make_phantom(100 + seed), folder, seed=100 + seed)
            folders.append(folder)
        mib = sum(p.stat().st_size for p in folders[0].iterdir()) / 2**20
        results: dict[tuple[str, int], float] = {}
        for senders in counts:
            times: dict[str, list[float]] = {name: [] for name in peers}
            for i in range(args.repeat):  # the peers take turns: a change of load hits all alike
                for name, runner in peers.items():
                    times[name].append(runner(root / f"{name}-{senders}-{i}", folders[:senders]))
            for name in peers:
                results[(name, senders)] = statistics.median(times[name])
                print(f"{name:<18} {senders} sender(s): {results[(name, senders)]:6.2f} s  "
                      f"{mib * senders / results[(name, senders)]:6.1f} MiB/s  "
                      f"(runs: {', '.join(f'{t:.2f}' for t in times[name])})", flush=True)
        print(f"\nseries: 200 x 512x512, {mib:.1f} MiB; median of {args.repeat}")
        for senders in counts:
            bare = results[("pynetdicom", senders)]
            print(f"{senders} sender(s): bare pynetdicom / orthanc speed = {results[('orthanc', senders)] / bare:.2f}x "
                  f"(the library's own floor on this machine)")
        for name in nodes:
            for senders in counts:
                node = results[(name, senders)]
                print(f"{senders} sender(s): {name} / storescp speed = {results[('storescp', senders)] / node:.2f}x, "
                      f"{name} / orthanc speed = {results[('orthanc', senders)] / node:.2f}x, "
                      f"{name} / bare pynetdicom speed = {results[('pynetdicom', senders)] / node:.2f}x")
                same = f"pynetdicom×{name.rpartition('×')[2]}"
                if (same, senders) in results:  # the library in as many processes as the node (> 1)
                    print(f"{senders} sender(s): {name} / {same} speed = {results[(same, senders)] / node:.2f}x, "
                          f"{same} / orthanc speed = {results[('orthanc', senders)] / results[(same, senders)]:.2f}x")
            if len(counts) > 1:
                print(f"scaling {args.senders} senders vs 1: {name} "
                      f"{args.senders * results[(name, 1)] / results[(name, args.senders)]:.2f}x")

        print_cpu(list(peers), counts, len(list(folders[0].iterdir())), results)


def print_cpu(names: list[str], counts: list[int], per_sender: int, results: dict[tuple[str, int], float]) -> None:
    """Each receiver's CPU per instance (user + system, medians), and what Orthanc's pace leaves
    for it: every core busy for Orthanc's seconds, less what the senders themselves spent, over
    the instances received. A receiver that needs more CPU per instance than that cannot keep
    Orthanc's pace on this machine, however it spreads the work over its cores."""
    cores = os.cpu_count() or 1
    print(f"\nCPU per instance (user + system, ms, medians; {per_sender} instances per sender, {cores} cores)")
    for senders in counts:
        instances = per_sender * senders
        for name in names:
            runs = CPU[(name, senders)]
            user = statistics.median(c.user for c in runs)
            system = statistics.median(c.system for c in runs)
            print(f"{senders} sender(s): {name:<18} {1000 * (user + system) / instances:5.2f} ms "
                  f"(user {1000 * user / instances:.2f} + system {1000 * system / instances:.2f}); "
                  f"senders {1000 * statistics.median(c.senders for c in runs) / instances:.2f} ms")
        senders_cpu = statistics.median(c.senders for c in CPU[("orthanc", senders)])
        budget = (cores * results[("orthanc", senders)] - senders_cpu) / instances
        print(f"{senders} sender(s): Orthanc's pace leaves a receiver at most {1000 * budget:.2f} ms of CPU per "
              f"instance ({cores} cores × {results[('orthanc', senders)]:.2f} s, less the senders' CPU)")


if __name__ == "__main__":
    main()

"""Benchmark: responses pynetdicom loses to its own reactor, as is and with ie_gateway.reactor.

Usage: .venv/bin/python bench/reactor.py [--echoes 3000] [--rounds 2] [--busy 4]

pynetdicom pauses an association's reactor thread before it sends a request, so that the
peer's response is left for the sender; its pause can be read as done while the reactor is
still passing it, and the reactor then takes the response as an unexpected message: the
sender waits its DIMSE timeout (2 s here) for nothing. The race needs a prompt peer and a busy
machine. This sends C-ECHOs on one association to dcmtk's storescp (TCP_NODELAY, so it answers
within a fraction of a millisecond), alternating pynetdicom as is and the guarded association
the node uses, while ``--busy`` processes spin on the CPU, and prints the responses lost and
the seconds each round took (each loss costs the 2 s timeout). A lost response is a failed
echo, after which pynetdicom aborts the association: the next echo goes on a new one.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from ie_gateway import reactor
from tests.peers import DCMTK_ENV, free_port, port_open, wait_until

DIMSE_TIMEOUT_S = 2


def plain(ae: AE, port: int) -> Association:
    return ae.associate("127.0.0.1", port, ae_title="STORESCP")


def guarded(ae: AE, port: int) -> Association:
    return reactor.associate(ae, "127.0.0.1", port, ae_title="STORESCP")


def echo_round(port: int, echoes: int, associate: Callable[[AE, int], Association]) -> tuple[int, float]:
    """(responses lost, seconds) for ``echoes`` C-ECHOs on one association."""
    ae = AE("BENCH")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    lost = 0
    started = time.monotonic()
    assoc = _open(ae, port, associate)
    try:
        for _ in range(echoes):
            if not assoc.is_established:  # aborted by pynetdicom after a lost response
                assoc = _open(ae, port, associate)
            if "Status" not in assoc.send_c_echo():
                lost += 1
    finally:
        assoc.release()
    return lost, time.monotonic() - started


def _open(ae: AE, port: int, associate: Callable[[AE, int], Association]) -> Association:
    assoc = associate(ae, port)
    assert assoc.is_established, "storescp refused the association"
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echoes", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=4, help="processes spinning on the CPU meanwhile")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        scp = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "-od", out, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            wait_until(lambda: port_open(port), 30, what="storescp")
            print(f"{args.echoes} C-ECHOs per round to dcmtk storescp, {args.busy} busy processes")
            print("| round | association | responses lost | seconds |")
            print("|---|---|---|---|")
            totals = {"pynetdicom as is": 0, "guarded (ie_gateway.reactor)": 0}
            for number in range(1, args.rounds + 1):
                for name, associate in zip(totals, (plain, guarded), strict=True):
                    lost, seconds = echo_round(port, args.echoes, associate)
                    totals[name] += lost
                    print(f"| {number} | {name} | {lost} | {seconds:.1f} |", flush=True)
            for name, lost in totals.items():
                print(f"{name}: {lost} of {args.echoes * args.rounds} responses lost")
        finally:
            for proc in busy:
                proc.kill()
            scp.terminate()
            scp.wait(timeout=20)


if __name__ == "__main__":
    main()

"""What load-balancer health probes and port scanners do to a DICOM port, as a subprocess.

``python -m tests.probes PORT CYCLES SECONDS SILENT``: hold SILENT connections open without a
word, and open-then-close CYCLES connections paced evenly over SECONDS; print one JSON line
with what was done. Run apart from the test process so its loop does not compete with the
test's own DICOM traffic for one interpreter.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    port, cycles, seconds, silent = int(args[0]), int(args[1]), float(args[2]), int(args[3])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(silent)]
    started = time.monotonic()
    done = 0
    while done < cycles:
        socket.create_connection(("127.0.0.1", port)).close()
        done += 1
        ahead = started + done * seconds / cycles - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the probes, not synchronisation
    dropped = sum(1 for s in held if _closed_by_peer(s))
    print(json.dumps({"cycles": done, "seconds": round(time.monotonic() - started, 2),
                      "silent": len(held), "silent_dropped_by_node": dropped}), flush=True)


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


if __name__ == "__main__":
    main()

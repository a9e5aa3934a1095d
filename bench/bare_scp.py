"""A bare pynetdicom Storage SCP: the peer that shows what the library itself costs.

Usage: .venv/bin/python bench/bare_scp.py PORT FOLDER [MAX_PDU_KB [PROCESSES]]

What pynetdicom's own storage example does, no more: every storage SOP class, each
instance written as a file by the handler (preamble, file meta, the data set as received), no
fsync, no index, no checks. ``bench/receive.py`` runs it beside the node, storescp and Orthanc,
so the node's ratio to it is the price of what the node adds to the library (durable writes,
the header read and checks, the index, the screening of associations), and its ratio to
Orthanc is what pynetdicom's per-message Python costs on the machine. With PROCESSES above 1
it forks after binding and every copy accepts from the one socket, with the node's rule for
who takes a new connection (``receive.ACCEPT_STEP_S``), so both spread senders alike.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from ie_gateway.receive import ACCEPT_STEP_S, MAX_ACCEPT_WAIT_S


class SharedServer(ThreadedAssociationServer):
    """Accepts from the listening socket made before the fork, as the node's listener
    processes do, taking a new connection after ACCEPT_STEP_S per association it serves."""

    shared: socket.socket

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.shared
        self.server_address = self.shared.getsockname()

    def server_activate(self) -> None:
        pass

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        time.sleep(min(MAX_ACCEPT_WAIT_S, ACCEPT_STEP_S * len(self.ae.active_associations)))
        return self.socket.accept()


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    processes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    SharedServer.shared = socket.create_server(("127.0.0.1", port), backlog=256)
    SharedServer.shared.setblocking(False)
    for copy in range(1, processes):
        if os.fork() == 0:
            folder = folder / f"p{copy}"  # each copy numbers its own files
            break
    folder.mkdir(parents=True, exist_ok=True)
    count = iter(range(1 << 62))

    def on_store(event: evt.Event) -> int:
        with (folder / f"{next(count)}.dcm").open("wb") as out:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, event.file_meta)
            out.write(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title="IE_GATEWAY")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = (int(sys.argv[3]) if len(sys.argv) > 3 else 256) * 1024
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)], server_class=SharedServer
    )
    (folder / LISTENING).touch()  # the bench waits for every copy's, so none is left out of the spread
    server.serve_forever()


LISTENING = ".listening"


if __name__ == "__main__":
    main()

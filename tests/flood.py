"""Heavy and hostile input: peers that announce a huge A-ASSOCIATE-RQ and stream bytes into it
(as a subprocess), one large instance, and the memory of a process, read from /proc.

``python -m tests.flood PORT PEERS MB SECONDS``: PEERS connections at once, each sending the
6-byte header of a 4 GiB A-ASSOCIATE-RQ and then up to MB MiB of filler; a peer the other side
hangs up on (or stops reading from for 2 s) connects again, until SECONDS have passed. Prints one
JSON line: connections made, MiB the other side took in, connections it closed. Run apart from
the test process so its threads do not compete with the test's own DICOM traffic.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

HUGE_REQUEST = b"\x01\x00" + struct.pack(">L", 0xFFFF_FFF0)  # A-ASSOCIATE-RQ, ~4 GiB announced
BLOCK = b"\x00" * (1 << 20)


class Peer(threading.Thread):
    def __init__(self, port: int, mib: int, until: float) -> None:
        super().__init__(daemon=True)
        self.port, self.mib, self.until = port, mib, until
        self.connections = self.closed_by_node = self.sent = 0

    def run(self) -> None:
        while time.monotonic() < self.until:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            except OSError:
                continue
            self.connections += 1
            with sock:
                self._stream(sock)

    def _stream(self, sock: socket.socket) -> None:
        try:
            sock.sendall(HUGE_REQUEST)
            for _ in range(self.mib):
                if time.monotonic() >= self.until:
                    return
                sock.sendall(BLOCK)
                self.sent += len(BLOCK)
        except TimeoutError:
            return  # the other side stopped reading: start again
        except OSError:
            self.closed_by_node += 1


def flood(port: int, peers: int, mib: int, seconds: float) -> dict[str, float]:
    until = time.monotonic() + seconds
    threads = [Peer(port, mib, until) for _ in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "peers": peers,
        "connections": sum(t.connections for t in threads),
        "closed_by_node": sum(t.closed_by_node for t in threads),
        "mib_taken": round(sum(t.sent for t in threads) / 2**20, 1),
    }


def big_instance(folder: Path, mib: int, in_header: bool = False) -> Path:
    """An Enhanced CT file of ``mib`` MiB (1024 x 1024 frames of 16 bits), within the default
    limits: one large instance, as a whole-body or 4D acquisition sends. ``in_header``: the
    bulk is a private OB value before a one-frame pixel data instead, as a hostile peer or a
    vendor's private blob puts it where the receiver reads the header."""
    import numpy as np
    import pydicom
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    frames = 1 if in_header else mib // 2
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if in_header:
        ds.add_new(0x00090010, "LO", "HOSTILE")
        ds.add_new(0x00091010, "OB", bytes(mib * 2**20))
    ds.PixelData = np.zeros((frames, 1024, 1024), np.uint16).tobytes()
    path = folder / f"big-{mib}{'-header' if in_header else ''}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start or since ``reset_peak``) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM back to its VmRSS (Linux clear_refs, value 5), so a later VmHWM
    is the peak of what came after."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    print(json.dumps(flood(int(args[0]), int(args[1]), int(args[2]), float(args[3]))), flush=True)


if __name__ == "__main__":
    main()

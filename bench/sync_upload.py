"""Sync throughput on a 200-slice 512² planning CT (~100 MiB): anonymise, upload to Azurite,
re-run (all skipped), against the SDK's plain upload of the same files as the peer baseline.

    .venv/bin/python -m bench.sync_upload [--slices 200] [--repeats 3]

Prints MiB/s per stage (median of the repeats) and the ratio of our upload to the plain one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from azure.storage.blob import ContainerClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.azurite, run from anywhere

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.sync.anonymise import Anonymiser
from ie_gateway.sync.blob import container_client, upload_case
from tests.azurite import running_azurite

MIB = 1024 * 1024


def _median_s(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fresh(connection: str) -> ContainerClient:
    client = container_client(connection, None, f"b{uuid.uuid4().hex[:12]}")
    client.create_container()
    return client


def _plain_upload(connection: str, files: list[Path]) -> None:
    client = _fresh(connection)
    for path in files:
        with path.open("rb") as fh:
            client.upload_blob(f"plain/{path.name}", fh, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ct = write_ct_series(make_phantom(3, slices=args.slices), root / "ct", seed=3)
        size = sum(p.stat().st_size for p in ct) / MIB
        anonymiser = Anonymiser(b"bench-key-0123456789abcdef", root / "map.sqlite3")
        out: dict[str, list[Path]] = {}

        def anonymise() -> None:
            out["ct"] = anonymiser.anonymise_files(ct, root / "anon")

        t_anon = _median_s(anonymise, args.repeats)
        with running_azurite(root / "azurite") as connection:
            t_plain = _median_s(lambda: _plain_upload(connection, out["ct"]), args.repeats)
            t_ours = _median_s(
                lambda: upload_case(_fresh(connection), "case", out, {"bench": True}),
                args.repeats,
            )
            client = _fresh(connection)
            upload_case(client, "case", out, {"bench": True})
            t_rerun = _median_s(lambda: upload_case(client, "case", out, {"bench": True}),
                                args.repeats)
    print(f"case: {len(ct)} slices, {size:.1f} MiB, median of {args.repeats}")
    print(f"anonymise                     {t_anon:6.2f} s  {size / t_anon:7.1f} MiB/s")
    print(f"plain SDK upload (peer)       {t_plain:6.2f} s  {size / t_plain:7.1f} MiB/s")
    print(f"upload_case (md5, 4 in flight){t_ours:6.2f} s  {size / t_ours:7.1f} MiB/s"
          f"  ratio to plain {t_plain / t_ours:.2f}x")
    print(f"upload_case re-run (skipped)  {t_rerun:6.2f} s")


if __name__ == "__main__":
    main()

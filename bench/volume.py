"""Benchmark: load time and peak memory of load_volume against SimpleITK's series reader (GDCM).

Usage: .venv/bin/python bench/volume.py [--slices 200 1000] [--size 512] [--repeat 3]

For each slice count a synthetic thorax series (uncompressed, 512² int16 ≈ 0.5 MiB per slice)
is written to a temporary folder (removed afterwards), then each loader runs in a fresh Python
process that imports everything, records its peak RSS so far (VmHWM) as the baseline, loads
the series, and reports the seconds and the peak RSS above that baseline. The goal for
load_volume is a peak of at most ~2x the voxel bytes; SimpleITK's ImageSeriesReader (no checks,
GDCM decoding) is the peer. Timings on these shared machines vary by 10-15 %: read the ratios,
and the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ie_gateway.demo.phantoms import make_phantom, write_ct_series

_CHILD = r"""
import json, sys, time
from pathlib import Path
import SimpleITK as sitk
from ie_gateway.volume import load_volume

def rss_bytes():
    # VmHWM, the peak RSS of this process image. ru_maxrss would do, but Linux carries the
    # parent's peak across fork+exec into it, and the parent just held a whole phantom.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

loader, listing = sys.argv[1], Path(sys.argv[2])
paths = [Path(line) for line in listing.read_text().splitlines()]
baseline = rss_bytes()
started = time.perf_counter()
if loader == "ie_gateway":
    image = load_volume(paths).image
else:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    image = reader.Execute()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_above_baseline": rss_bytes() - baseline,
                  "pixel_type": image.GetPixelIDTypeAsString()}))
"""

LOADERS = ("ie_gateway", "sitk_series_reader")


def measure(loader: str, listing: Path) -> dict[str, float | str]:
    """Run one loader in a fresh process; return its seconds and peak RSS above baseline."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, loader, str(listing)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, float | str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench(slices: int, size: int, repeat: int) -> None:
    """Write one series and print both loaders' figures and their ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-volume-") as tmp:
        folder = Path(tmp)
        paths = write_ct_series(make_phantom(1, slices=slices, size=size), folder / "ct", seed=1)
        listing = folder / "paths.txt"
        listing.write_text("\n".join(str(p) for p in reversed(paths)))
        on_disk = sum(p.stat().st_size for p in paths)
        voxel_bytes = slices * size * size * 2
        print(f"\n{slices} slices x {size}^2: {on_disk / 2**20:.0f} MiB of DICOM, "
              f"voxel bytes (int16) {voxel_bytes / 2**20:.0f} MiB")
        figures = {}
        for loader in LOADERS:
            runs = [measure(loader, listing) for _ in range(repeat)]
            seconds = statistics.median(float(r["seconds"]) for r in runs)
            peak = max(float(r["peak_above_baseline"]) for r in runs)
            figures[loader] = (seconds, peak)
            print(f"  {loader:20s} {seconds:6.2f} s  {slices / seconds:7.0f} slices/s  "
                  f"peak +{peak / 2**20:6.0f} MiB = {peak / voxel_bytes:.2f}x voxel bytes  "
                  f"({runs[0]['pixel_type']})")
        ours, peer = figures["ie_gateway"], figures["sitk_series_reader"]
        print(f"  ratio ie_gateway / sitk: time {ours[0] / peer[0]:.2f}, "
              f"peak memory {ours[1] / peer[1]:.2f}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the benchmark for each slice count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for slices in args.slices:
        bench(slices, args.size, args.repeat)


if __name__ == "__main__":
    main()

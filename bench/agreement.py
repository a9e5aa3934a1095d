"""Benchmark: the agreement figures of one thorax CT's structures against an edited copy.

Usage: .venv/bin/python bench/agreement.py [--slices 200] [--size 512] [--repeat 3]

The phantom's labels stand in for the AI's contours; the "approved" copy has every structure
eroded by 3 mm. ``agreement.measure`` (MONAI: Dice, HD95, mean surface distance, surface Dice)
runs per structure; the peer is DeepMind's surface-distance computing its own surface
distances, HD95, mean surface distance and surface Dice on the same masks. Times are the median
of --repeat runs (wall seconds, all structures); the first MONAI import is timed on its own.
These shared machines vary by 10-15 %: read the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import surface_distance  # type: ignore[import-untyped]  # DeepMind's package ships no type hints
from scipy import ndimage

from ie_gateway.demo.phantoms import STRUCTURES, make_phantom
from ie_gateway.qa.agreement import measure


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    phantom = make_phantom(11, slices=args.slices, size=args.size)
    spacing = (phantom.slice_mm, phantom.pixel_mm, phantom.pixel_mm)
    pairs, gone = [], []
    for label, name in enumerate(STRUCTURES, start=1):
        ai = phantom.labels == label
        approved = ndimage.distance_transform_edt(ai, sampling=spacing) > 3.0
        if approved.any():
            pairs.append((ai, approved))
        else:  # surface-distance 0.1 uses np.Inf (gone in numpy 2) for an empty mask's distances
            gone.append(name)
    if gone:
        print(f"left out (nothing left after the erosion on this small grid): {', '.join(gone)}")

    started = time.perf_counter()
    measure(*pairs[0], spacing)  # measure imports MONAI on its first call
    first = time.perf_counter() - started

    def node() -> None:
        for ai, approved in pairs:
            measure(ai, approved, spacing, tolerance_mm=2.0)

    def peer() -> None:
        for ai, approved in pairs:
            d = surface_distance.compute_surface_distances(approved, ai, spacing)
            surface_distance.compute_dice_coefficient(approved, ai)
            surface_distance.compute_robust_hausdorff(d, 95)
            surface_distance.compute_average_surface_distance(d)
            surface_distance.compute_surface_dice_at_tolerance(d, 2.0)

    node_s, peer_s = timed(node, args.repeat), timed(peer, args.repeat)
    voxels = int(np.prod(phantom.labels.shape))
    print(f"CT {phantom.labels.shape} ({voxels / 1e6:.0f} M voxels), {len(pairs)} structures, "
          f"median of {args.repeat}")
    print(f"first call incl. MONAI import: {first:.2f} s")
    print(f"agreement.measure (MONAI):     {node_s:.2f} s")
    print(f"surface-distance (DeepMind):   {peer_s:.2f} s")
    print(f"ratio node / peer:             {node_s / peer_s:.2f}")


if __name__ == "__main__":
    main()

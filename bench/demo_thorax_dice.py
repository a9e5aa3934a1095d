"""Accuracy of the shipped demo-thorax ensemble on held-out phantoms, on the CT's own grid.

For each held-out seed (>= 10000, never used in training) a synthetic CT series is written,
loaded with ``load_volume`` and contoured by ``Ensemble.segment`` on the CPU; prints the Dice of
every structure against the phantom's exact labels, the mean per structure, and the time of
``segment``. Run: ``.venv/bin/python bench/demo_thorax_dice.py [--model NAME@VERSION]
[--seeds 10001 ...]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ie_gateway.config import load_config
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom, write_ct_series
from ie_gateway.infer.ensemble import Ensemble
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.signing import trusted_keys
from ie_gateway.volume import load_volume
from ie_gateway.write.validate import dice

REPO = Path(__file__).resolve().parents[1]


def dice_per_structure(predicted: np.ndarray, truth: np.ndarray) -> list[float]:
    return [dice(predicted == label, truth == label) for label in range(1, len(STRUCTURES) + 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-thorax", help="NAME or NAME@VERSION")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10_001, 10_002, 10_003, 10_004])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--pixel-mm", type=float, default=1.4)
    parser.add_argument("--slice-mm", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "gateway.yaml",
                        help="the node config whose trusted_keys a package must be signed by")
    args = parser.parse_args(argv)
    keys = trusted_keys(load_config(args.config))
    if min(args.seeds) < 10_000:
        parser.error("seeds below 10000 were used in training; use held-out seeds")
    with tempfile.TemporaryDirectory() as tmp:
        model = Registry(REPO / "models", Path(tmp) / "state.json", keys=keys).resolve(args.model)
        ensemble = Ensemble(model, device="cpu", threads=args.threads)
        print(
            f"{model.spec}, threads {torch.get_num_threads()}, "
            f"grid {args.slices} x {args.size}² at {args.pixel_mm} x {args.slice_mm} mm"
        )
        print("seed    " + " ".join(f"{name:>10}" for name in STRUCTURES) + "   segment_s")
        rows = []
        for seed in args.seeds:
            phantom = make_phantom(
                seed,
                slices=args.slices,
                size=args.size,
                pixel_mm=args.pixel_mm,
                slice_mm=args.slice_mm,
            )
            volume = load_volume(write_ct_series(phantom, Path(tmp) / str(seed), seed=seed))
            start = time.perf_counter()
            labels = ensemble.segment(volume.image).labels
            seconds = time.perf_counter() - start
            rows.append(dice_per_structure(sitk.GetArrayViewFromImage(labels), phantom.labels))
            print(f"{seed:<7} " + " ".join(f"{d:>10.4f}" for d in rows[-1]) + f"   {seconds:9.1f}")
        mean = np.mean(rows, axis=0)
        print("mean    " + " ".join(f"{d:>10.4f}" for d in mean))
        print("min     " + " ".join(f"{d:>10.4f}" for d in np.min(rows, axis=0)))


if __name__ == "__main__":
    main()

"""Train the demo-thorax model: a small 3D U-Net, three cross-validation folds, on synthetic CTs.

Run from the repository root (CPU; about 30 minutes on 2 cores), one fold per process:

    for k in 0 1 2; do .venv/bin/python models/demo-thorax/train.py --out models/demo-thorax/2 --folds $k --threads 1 & done; wait

The last fold to finish scores all three on their validation seeds and writes model.yaml
(``--folds`` with no value does only that); ``--out`` alone trains all folds in one process.

Everything is seeded, so a rerun on the same torch build reproduces the folds: the same weights
and code (measured for version 2: every entry of each fold file identical but TorchScript's
debug source path and its random serialization id, so the sha256 differ). Phantoms come
from :mod:`ie_gateway.demo.phantoms` on varied native grids (pixel 0.7-1.2 mm, slices 1.5-3 mm,
field of view and length) and are preprocessed exactly as the inference engine does: linear
resampling of HU onto the model grid, clip to the window, scale to [0, 1]. Labels are resampled
as anti-aliased one-hot fractions, so the folds learn partial volumes and the engine's linear
resampling of probabilities back to the CT grid places boundaries below the model voxel size.

Seeds: training and validation use seeds 0..POOL-1 (fold k validates on seeds with
seed % FOLDS == k and trains on the rest); seeds >= HELD_OUT_FROM are never used here, so
accuracy tests can draw unseen patients from them.

Batch norm speeds training but, learnt on small varied patches, leans on each batch's
statistics; so for the last 30 % of the steps its statistics are measured over many batches and
frozen (evaluation mode), and the fold finishes training as the fixed network it is exported as.
Instance norm is not used: it depends on the patch's content, which differs between training
patches and the engine's large windows.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ie_gateway.infer.signing import sign_model
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom

DEMO_KEY = Path(__file__).resolve().parents[2] / "keys" / "demo-only-publisher"
HELD_OUT_FROM = 10_000  # seeds at or above this are never used for training or validation
POOL = 30
FOLDS = 3
SPACING = (2.5, 2.5, 3.0)  # x, y, z mm
LABEL_SUPERSAMPLING = (3, 3, 1)  # x, y, z: label samples per model voxel edge for soft labels
MAX_NATIVE_VOXELS = 30_000_000
WINDOW = (-1000.0, 1000.0)
# A fixed second input channel inside the network: HU -120..120 stretched to [0, 1]. The heart's
# fat rim and the cord-to-CSF step are a few hundredths of the [0, 1] input; this channel makes
# them tenths, which the folds learn in hundreds of steps instead of thousands.
SOFT_TISSUE_HU = (-120.0, 120.0)
TRAIN_PATCH = (24, 64, 64)  # z, y, x: 72 mm of z, enough to see a heart's top or bottom
INFER_PATCH = (48, 208, 208)  # a whole 52 cm field of view in-plane: sliding windows along z only
CHANNELS = (8, 16, 32, 64)
CLASSES = len(STRUCTURES) + 1
# The network segments one "lung" class (label 2 of 0..4 below); the exported model splits it into
# Lung_L / Lung_R at the body's midline. Telling left from right by the network alone needs
# context across the whole chest, which small training patches and a short training do not give.
NET_CLASSES = CLASSES - 1
NET_LUNG = 2
# background, External, lungs, heart, cord: the small structures weigh more in cross-entropy
CE_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 2.0, 4.0])
FREEZE_AT = 0.7  # fraction of the steps after which batch norm statistics are fixed
SAMPLE_STRUCTURES = ((2, 3), (4,), (5,), (1,))  # lungs, heart, cord, External: patch centres
# (External: the soft tissue below the lungs and round the heart is where a heart is over-called)
COLOURS = {
    "External": [0, 200, 0],
    "Lung_L": [0, 128, 255],
    "Lung_R": [255, 200, 0],
    "Heart": [220, 30, 30],
    "SpinalCord": [255, 255, 0],
}
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Case:
    """One phantom on the model grid: image in [0, 1] and soft labels (C, z, y, x) in 0..255."""

    seed: int
    image: np.ndarray  # float16 (z, y, x)
    soft: np.ndarray  # uint8 (C, z, y, x), fractions x 255


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class _Up(nn.Module):
    """Decoder level: upsample the deeper features, join the skip connection, two convolutions."""

    def __init__(self, deep: int, width: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(deep, width, 2, stride=2)
        self.merge = nn.Sequential(_block(2 * width, width), _block(width, width))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.up(x), skip], dim=1))


class UNet3D(nn.Module):
    """Four-level 3D U-Net; input (N, 1, Z, Y, X) with Z, Y, X multiples of 8; output logits.

    The input (windowed HU in [0, 1]) is joined by its soft-tissue window as a second channel.
    """

    def __init__(self, channels: tuple[int, ...] = CHANNELS, classes: int = NET_CLASSES) -> None:
        super().__init__()
        low, high = ((h - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) for h in SOFT_TISSUE_HU)
        self.soft_low, self.soft_gain = low, 1.0 / (high - low)
        widths = [2, *channels]
        self.down = nn.ModuleList(
            nn.Sequential(_block(widths[i], widths[i + 1]), _block(widths[i + 1], widths[i + 1]))
            for i in range(len(channels))
        )
        # deepest decoder first, so forward() can walk both lists with enumerate
        self.ups = nn.ModuleList(
            _Up(channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv3d(channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = torch.clamp((x - self.soft_low) * self.soft_gain, 0.0, 1.0)
        x = torch.cat([x, soft], dim=1)
        skips: list[torch.Tensor] = []
        for level, down in enumerate(self.down):
            if level > 0:
                skips.append(x)
                x = F.max_pool3d(x, 2)
            x = down(x)
        for i, up in enumerate(self.ups):
            x = up(x, skips[len(skips) - 1 - i])
        return self.head(x)


class DemoThorax(nn.Module):
    """The exported fold: the U-Net, then its lung class split at the body's midline.

    Left (Lung_L) is +x, the higher column index. The midline is the x centroid of the voxels
    the network calls body (any label but background) in the whole input window, so the window
    must span the patient left to right: the manifest's patch covers a 52 cm field of view.
    """

    def __init__(self, net: UNet3D) -> None:
        super().__init__()
        self.net = net
        self.lung = NET_LUNG

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        body = 1.0 - torch.softmax(logits, dim=1)[:, 0]
        columns = torch.arange(x.shape[-1], dtype=body.dtype, device=body.device)
        weight = body.sum(dim=(1, 2))
        midline = (weight * columns).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-6)
        left = (columns[None, :] > midline[:, None])[:, None, None, None, :]
        lung = logits[:, self.lung : self.lung + 1]
        absent = lung - 100.0
        return torch.cat(
            [
                logits[:, : self.lung],
                torch.where(left, lung, absent),
                torch.where(left, absent, lung),
                logits[:, self.lung + 1 :],
            ],
            dim=1,
        )


def native_grid(seed: int) -> dict[str, float | int]:
    """A varied scanner grid for one phantom: pixel, slice spacing, field of view, length."""
    rng = np.random.default_rng([seed, 0x6B1D])
    pixel = float(rng.uniform(0.7, 1.2))
    slice_mm = float(rng.uniform(1.5, 3.0))
    fov = float(rng.uniform(360.0, 500.0))
    length = float(rng.uniform(200.0, 420.0))
    size = int(fov / pixel)
    slices = min(int(length / slice_mm), MAX_NATIVE_VOXELS // (size * size))  # keeps drawing fast
    return {"pixel_mm": pixel, "slice_mm": slice_mm, "size": size, "slices": slices}


def _model_grid(image: sitk.Image) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Origin and size of the model grid covering the image's voxel centres (as the engine does)."""
    size = image.GetSize()
    spacing = image.GetSpacing()
    extent = [(n - 1) * s for n, s in zip(size, spacing, strict=True)]
    grid = tuple(math.ceil(e / t - 1e-6) + 1 for e, t in zip(extent, SPACING, strict=True))
    return image.GetOrigin(), grid


def _resample(
    image: sitk.Image, origin: tuple[float, ...], size: tuple[int, ...], default: float
) -> np.ndarray:
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        SPACING,
        _IDENTITY,
        default,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def make_case(seed: int) -> Case:
    """Draw a phantom on its native grid and bring it to the model grid like the engine does."""
    p = make_phantom(seed, **native_grid(seed))  # type: ignore[arg-type]
    spacing = (p.pixel_mm, p.pixel_mm, p.slice_mm)
    ct = sitk.GetImageFromArray(p.hu.astype(np.float32))
    ct.SetOrigin(p.origin)
    ct.SetSpacing(spacing)
    labels = sitk.GetImageFromArray(p.labels)
    labels.CopyInformation(ct)
    origin, size = _model_grid(ct)
    low, high = WINDOW
    image = (np.clip(_resample(ct, origin, size, low), low, high) - low) / (high - low)
    del ct
    soft = soft_labels(labels, origin, size)
    return Case(seed, image.astype(np.float16), soft)


def soft_labels(labels: sitk.Image, origin: tuple[float, ...], size: tuple[int, ...]) -> np.ndarray:
    """Per-class fractions of each model voxel (C, z, y, x, uint8 x 255), from a supersampled grid.

    Labels are sampled (nearest) at LABEL_SUPERSAMPLING points per model voxel and averaged, so
    the targets carry partial volumes instead of the staircase of a nearest-neighbour resample.
    """
    factor = LABEL_SUPERSAMPLING
    fine_spacing = tuple(s / f for s, f in zip(SPACING, factor, strict=True))
    fine_origin = tuple(
        o - s / 2 + t / 2 for o, s, t in zip(origin, SPACING, fine_spacing, strict=True)
    )
    fine_size = tuple(n * f for n, f in zip(size, factor, strict=True))
    fine = sitk.Resample(
        labels,
        fine_size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        fine_origin,
        fine_spacing,
        _IDENTITY,
        0,
    )
    nx, ny, nz = size
    fx, fy, fz = factor
    blocks = sitk.GetArrayViewFromImage(fine).reshape(nz, fz, ny, fy, nx, fx)
    soft = np.empty((CLASSES, nz, ny, nx), dtype=np.uint8)
    for c in range(CLASSES):
        count = (blocks == c).sum(axis=(1, 3, 5), dtype=np.uint16)
        soft[c] = np.rint(count * (255.0 / (fx * fy * fz)))
    return soft


def sample_patch(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training patch (image, soft targets with one lung class), 75 % centred on a structure."""
    shape = case.image.shape
    centre = tuple(int(rng.integers(n)) for n in shape)
    if rng.random() < 0.75:
        labels = SAMPLE_STRUCTURES[int(rng.integers(len(SAMPLE_STRUCTURES)))]
        zs, ys, xs = np.nonzero(np.sum([case.soft[c] for c in labels], axis=0) > 127)
        if len(zs):
            i = int(rng.integers(len(zs)))
            centre = (int(zs[i]), int(ys[i]), int(xs[i]))
    image = np.zeros(TRAIN_PATCH, dtype=np.float32)
    soft = np.zeros((NET_CLASSES, *TRAIN_PATCH), dtype=np.float32)
    soft[0] = 1.0  # outside the volume: air, background
    src, dst = [], []
    for c, p, n in zip(centre, TRAIN_PATCH, shape, strict=True):
        start = c - p // 2 + int(rng.integers(-p // 4, p // 4 + 1))
        lo, hi = max(start, 0), min(start + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    image[tuple(dst)] = case.image[tuple(src)]
    labels = case.soft[(slice(None), *src)] / np.float32(255.0)
    soft[(slice(None), *dst)] = np.concatenate(
        [labels[:NET_LUNG], labels[NET_LUNG : NET_LUNG + 2].sum(axis=0, keepdims=True), labels[4:]]
    )
    return image, soft


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on soft targets plus soft Dice of the structures (batch-wise)."""
    ce = F.cross_entropy(logits, target, weight=CE_WEIGHTS.to(logits.dtype))
    probs = logits.softmax(dim=1)[:, 1:]
    fg = target[:, 1:]
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * fg).sum(dims) + 1.0) / (probs.sum(dims) + fg.sum(dims) + 1.0)
    return ce + (1.0 - dice.mean())


def _pad8(volume: np.ndarray) -> np.ndarray:
    pad = [(0, (-n) % 8) for n in volume.shape]
    return np.pad(volume, pad)


@torch.inference_mode()
def dice_scores(fold: nn.Module, cases: list[Case]) -> dict[str, float]:
    """Mean Dice per structure over ``cases``: one full-volume forward pass at model spacing."""
    scores = np.zeros((len(cases), CLASSES - 1))
    for i, case in enumerate(cases):
        z, y, x = case.image.shape
        volume = torch.from_numpy(_pad8(case.image.astype(np.float32)))[None, None]
        predicted = fold(volume)[0, :, :z, :y, :x].argmax(0).numpy()
        truth = case.soft.argmax(0)
        for c in range(1, CLASSES):
            a, b = predicted == c, truth == c
            scores[i, c - 1] = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    return {
        name: round(float(s), 4) for name, s in zip(STRUCTURES, scores.mean(axis=0), strict=True)
    }


def validate(model: nn.Module, cases: list[Case]) -> dict[str, float]:
    """Dice of ``model`` in evaluation mode; the layers' training modes are restored after."""
    modes = [m.training for m in model.modules()]
    model.eval()
    scores = dice_scores(model, cases)
    for m, mode in zip(model.modules(), modes, strict=True):
        m.training = mode
    return scores


def freeze_batch_norm(net: nn.Module, batches: list[torch.Tensor]) -> None:
    """Measure each batch norm's statistics as the plain mean over ``batches``, then fix them."""
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for x in batches:
            net(x)
    for bn in layers:
        bn.eval()


def _batch(
    cases: list[Case], size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    patches = [sample_patch(cases[int(rng.integers(len(cases)))], rng) for _ in range(size)]
    x = torch.from_numpy(np.stack([p[0] for p in patches]))[:, None]
    return x, torch.from_numpy(np.stack([p[1] for p in patches]))


def train_fold(fold: int, cases: list[Case], steps: int, batch: int, log: Log) -> nn.Module:
    """Train one fold on the cases outside its validation share."""
    torch.manual_seed(1000 + fold)
    rng = np.random.default_rng(2000 + fold)
    train = [c for c in cases if c.seed % FOLDS != fold]
    val = [c for c in cases if c.seed % FOLDS == fold]
    net = UNet3D()
    model = DemoThorax(net)
    optimiser = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=4e-3, total_steps=steps, pct_start=0.05
    )
    start = time.perf_counter()
    for step in range(steps):
        if step == int(FREEZE_AT * steps):
            freeze_batch_norm(net, [_batch(train, batch, rng)[0] for _ in range(24)])
            log(f"fold {fold} step {step} batch norm frozen")
        x, y = _batch(train, batch, rng)
        loss = loss_fn(net(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log(
                f"fold {fold} step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s"
            )
        if step % 150 == 149:
            log(
                f"fold {fold} step {step} Dice on two validation phantoms: "
                f"{validate(model, val[:2])}"
            )
    return model.eval()


class Log:
    """Print with a timestamp and flush, so ``nohup`` logs can be followed while training runs."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


def export(model: nn.Module, path: Path) -> None:
    """Save the fold as frozen TorchScript (batch norm folded into the convolutions)."""
    torch.jit.freeze(torch.jit.script(model.eval())).save(str(path))


def write_manifest(out: Path, hashes: list[str], dice: list[dict[str, float]], pool: int) -> None:
    structures = [
        {
            "label": i + 1,
            "name": name,
            "color": COLOURS[name],
            "interpreted_type": "EXTERNAL" if name == "External" else "ORGAN",
            "postprocess": {"largest_component": True, "fill_holes": True, "min_volume_cc": 0.0},
        }
        for i, name in enumerate(STRUCTURES)
    ]
    mean = {name: round(float(np.mean([d[name] for d in dice])), 4) for name in STRUCTURES}
    manifest = {
        "name": "demo-thorax",
        "version": out.name,
        "description": (
            "Demo thorax contouring (External, lungs, heart, spinal cord) trained on synthetic "
            f"phantoms (ie_gateway.demo.phantoms seeds 0..{pool - 1}) by models/demo-thorax/train.py; "
            f"{FOLDS}-fold cross-validation Dice at model spacing {mean}. Not for clinical use."
        ),
        "structures": structures,
        "input": {
            "spacing_mm": list(SPACING),
            "orientation": "LPS",
            "intensity": {"window": list(WINDOW)},
            "patch_size": list(INFER_PATCH),
            "overlap": 0.25,
            "batch_size": 1,
        },
        "folds": [{"file": f"fold{i}.pt", "sha256": h} for i, h in enumerate(hashes)],
    }
    (out / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, width=100))
    # signed with the demo key nodes trust in config/gateway.yaml (demo only: see keys/README.md)
    sign_model(out, DEMO_KEY)


def validate_package(out: Path, cases: list[Case], log: Log) -> None:
    """Score every exported fold file on its validation seeds and write model.yaml."""
    hashes, dice = [], []
    for fold in range(FOLDS):
        path = out / f"fold{fold}.pt"
        val = [c for c in cases if c.seed % FOLDS == fold]
        scores = dice_scores(torch.jit.load(str(path)).eval(), val)
        log(f"fold {fold} validation Dice on seeds {[c.seed for c in val]}: {scores}")
        hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
        dice.append(scores)
    write_manifest(out, hashes, dice, len(cases))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="package folder models/demo-thorax/<version>"
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps per fold")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--pool", type=int, default=POOL, help="phantom seeds 0..pool-1")
    parser.add_argument(
        "--folds",
        type=int,
        nargs="*",
        default=list(range(FOLDS)),
        help="folds to train (several processes may train one each); none: only validate",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.pool > HELD_OUT_FROM:
        parser.error(f"seeds >= {HELD_OUT_FROM} are held out for testing")
    if args.steps < 40:
        parser.error("--steps must be at least 40: the learning-rate warm-up is 5 % of them")
    torch.set_num_threads(args.threads)
    log = Log()
    cases = []
    for seed in range(args.pool):
        cases.append(make_case(seed))
        log(f"phantom {seed} grid {cases[-1].image.shape}")
    args.out.mkdir(parents=True, exist_ok=True)
    for fold in args.folds:
        export(train_fold(fold, cases, args.steps, args.batch, log), args.out / f"fold{fold}.pt")
        log(f"fold {fold} exported")
    if all((args.out / f"fold{fold}.pt").is_file() for fold in range(FOLDS)):
        validate_package(args.out, cases, log)
        log(f"done: {args.out}")


if __name__ == "__main__":
    main()

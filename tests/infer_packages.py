"""Tiny TorchScript model packages with known outputs, for the inference tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.keys import DEMO_KEY, sign

NAMES = ("External", "Lung_L", "Lung_R", "Heart", "SpinalCord")


class Pointwise(torch.nn.Module):
    """logits[c] = weight[c] * x + bias[c]: a 1x1x1 convolution with fixed weights."""

    def __init__(self, weight: Sequence[float], bias: Sequence[float]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, len(weight), kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weight).reshape(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Spin(torch.nn.Module):
    """Pointwise logits after ``iterations`` interpreted loop steps: a model that runs long."""

    def __init__(self, channels: int, iterations: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, channels, kernel_size=1)
        with torch.no_grad():  # fixed, not random, weights: the last label is the body, never empty
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[-1] = 40.0
            self.conv.bias[-1] = -10.0
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(self.iterations):
            y = y * 1.0
        return self.conv(y)


def threshold_model(channels: int, level: float = 0.5, steepness: float = 40.0) -> Pointwise:
    """Label ``channels - 1`` where the windowed intensity exceeds ``level``, else background."""
    weight = [0.0] * channels
    bias = [0.0] * channels
    weight[-1], bias[-1] = steepness, -steepness * level
    return Pointwise(weight, bias)


def write_package(
    root: Path,
    folds: Sequence[torch.nn.Module],
    *,
    name: str = "toy",
    version: str = "1",
    structures: int = 2,
    patch: tuple[int, int, int] = (8, 8, 8),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    overlap: float = 0.5,
    batch_size: int = 2,
    window: tuple[float, float] = (-1000.0, 1000.0),
    postprocess: dict[str, Any] | None = None,
    key: Path | None = DEMO_KEY,
) -> Path:
    """Script ``folds`` into ``root/<name>/<version>/`` with a model.yaml, signed with ``key``
    (the demo key the test nodes trust; None: unsigned); return that folder."""
    folder = root / name / version
    folder.mkdir(parents=True)
    fold_entries = []
    for index, module in enumerate(folds):
        path = folder / f"fold{index}.pt"
        torch.jit.script(module.eval()).save(str(path))
        fold_entries.append(
            {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        )
    manifest = {
        "name": name,
        "version": version,
        "description": "test package",
        "structures": [
            {
                "label": label,
                "name": NAMES[label - 1],
                "color": [label * 40, 100, 0],
                "interpreted_type": "EXTERNAL" if label == 1 else "ORGAN",
                "postprocess": postprocess or {},
            }
            for label in range(1, structures + 1)
        ],
        "input": {
            "spacing_mm": list(spacing),
            "orientation": "LPS",
            "intensity": {"window": list(window)},
            "patch_size": list(patch),
            "overlap": overlap,
            "batch_size": batch_size,
        },
        "folds": fold_entries,
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return folder if key is None else sign(folder, key)

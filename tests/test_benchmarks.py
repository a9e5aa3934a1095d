"""The CPU benchmarks of the shipped demo model, run tiny so that they cannot rot: each loads
the package as a node does (signature checked against the example config's trusted_keys), runs
it and prints its table. (Both once failed on every run after packages had to be signed.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_inference_benchmark_runs_the_signed_demo_model() -> None:
    out = _run("infer.py", "--slices", "12", "--size", "64")
    assert any("model_verified" in line and "model=demo-thorax@" in line for line in out.splitlines())
    total = next(line.split() for line in out.splitlines() if line.startswith("total"))
    assert all(float(cell.rstrip("s")) > 0 for cell in total[1:])  # cold and warm job timed
    assert "Dice vs the phantom's labels: External" in out


@pytest.mark.slow
def test_the_accuracy_benchmark_runs_the_signed_demo_model() -> None:
    out = _run("demo_thorax_dice.py", "--seeds", "10001", "--slices", "24", "--size", "64")
    assert any(line.startswith("demo-thorax@") for line in out.splitlines())  # the table's title
    mean = next(line.split() for line in out.splitlines() if line.startswith("mean"))
    assert len(mean) == 1 + 5  # a Dice per structure of the demo model

"""Benchmarks run tiny so that they cannot rot. Several failed on every run, unnoticed, once
model packages had to be signed (they trusted no key) or a peer library changed; the figures
are theirs to print, these tests only check that each runs to its table."""

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


@pytest.mark.slow
def test_the_commissioning_benchmark_runs_a_case_through_the_signed_demo_model() -> None:
    out = _run("commission.py", "--cases", "1", "--slices", "24", "--size", "64")
    assert "1 cases of 24 x 64^2 on cpu" in out


@pytest.mark.slow
def test_the_agreement_benchmark_compares_with_its_second_library() -> None:
    out = _run("agreement.py", "--slices", "40", "--size", "128", "--repeat", "1")
    assert "ratio node / peer:" in out


@pytest.mark.slow
@pytest.mark.peer
def test_the_viewer_benchmark_shows_slices_in_chromium() -> None:
    out = _run("viewer.py", "--slices", "24", "--size", "64", "--presses", "3")
    assert "over 3 presses" in out  # every key press shown


@pytest.mark.slow
@pytest.mark.peer
def test_the_upload_benchmark_uploads_to_azurite() -> None:
    out = _run("sync_upload.py", "--slices", "10", "--repeats", "1")
    assert "upload_case re-run (skipped)" in out

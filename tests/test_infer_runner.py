"""Inference in a child process: results on disk, a real time limit, survival after failures."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.errors import InferenceError
from ie_gateway.infer.manifest import load_manifest
from ie_gateway.infer.registry import ModelVersion
from ie_gateway.infer.runner import CHILD_NICENESS, InferenceRunner
from tests.infer_packages import Spin, threshold_model, write_package
from tests.peers import wait_until

pytestmark = pytest.mark.slow  # each runner spawns a Python with torch (seconds here)

TIMEOUT_S = 120.0  # generous: the shared test machine can be slow to start a child


def package(root: Path, folds: list, name: str) -> ModelVersion:
    folder = write_package(root, folds, name=name, structures=1, patch=(16, 32, 32))
    manifest = load_manifest(folder)
    return ModelVersion(manifest.name, manifest.version, folder, manifest)


@pytest.fixture
def ct_path(tmp_path: Path) -> Path:
    phantom = make_phantom(5, slices=16, size=64, pixel_mm=6.0, slice_mm=5.0)
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
    image.SetOrigin(phantom.origin)
    path = tmp_path / "ct.mha"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def runner() -> Iterator[InferenceRunner]:
    with InferenceRunner(TIMEOUT_S, device="cpu", log_level=None) as runner:
        yield runner


def check_labels(labels_path: Path, ct_path: Path, result: dict) -> None:
    ct = sitk.ReadImage(str(ct_path))
    labels = sitk.ReadImage(str(labels_path))
    assert labels.GetSize() == ct.GetSize() and labels.GetOrigin() == ct.GetOrigin()
    body = sitk.GetArrayFromImage(labels) == 1
    assert body.sum() > 0
    voxel_cc = np.prod(ct.GetSpacing()) / 1000
    assert result.volumes_cc["External"] == pytest.approx(body.sum() * voxel_cc)
    assert [p.name for p in labels_path.parent.iterdir() if p.name.startswith(".")] == []


def test_runner_writes_the_label_map_and_returns_volumes(
    tmp_path: Path, ct_path: Path, runner: InferenceRunner
) -> None:
    model = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    labels_path = tmp_path / "labels.mha"
    assert runner.pid is None  # no torch process until there is work for one
    result = runner.run(model, ct_path, labels_path)
    check_labels(labels_path, ct_path, result)
    assert result.folds == 1 and "total" in result.timings_s
    assert runner.pid is not None


def test_the_model_runs_at_a_lower_cpu_priority_than_the_node(
    tmp_path: Path, ct_path: Path, runner: InferenceRunner
) -> None:
    model = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    runner.run(model, ct_path, tmp_path / "labels.mha")
    assert runner.pid is not None
    node = os.getpriority(os.PRIO_PROCESS, 0)
    child_threads = os.listdir(f"/proc/{runner.pid}/task")
    assert len(child_threads) > 1  # torch's and the child's own threads, all of them lowered
    for thread in child_threads:
        assert os.getpriority(os.PRIO_PROCESS, int(thread)) == min(node + CHILD_NICENESS, 19)


def test_a_job_past_the_time_limit_fails_and_the_next_job_completes(tmp_path: Path, ct_path: Path) -> None:
    slow = package(tmp_path / "models", [Spin(2, iterations=10**12)], "slow")
    quick = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    with InferenceRunner(TIMEOUT_S, device="cpu", log_level=None) as runner:
        runner.run(quick, ct_path, tmp_path / "warm.mha")  # child up: the limit then hits the model
        runner.timeout_s = 3.0
        with pytest.raises(InferenceError, match="inference exceeded 3 s"):
            runner.run(slow, ct_path, tmp_path / "slow.mha")
        assert not (tmp_path / "slow.mha").exists()
        runner.timeout_s = TIMEOUT_S  # the fresh child must import torch and reload the model
        result = runner.run(quick, ct_path, tmp_path / "labels.mha")
    check_labels(tmp_path / "labels.mha", ct_path, result)


def test_a_failing_job_reports_why_and_the_runner_serves_on(
    tmp_path: Path, ct_path: Path, runner: InferenceRunner
) -> None:
    model = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    with pytest.raises(InferenceError, match="cannot be handed"):
        runner.run(model, tmp_path / "missing.mha", tmp_path / "never.mha")
    (tmp_path / "garbage.mha").write_bytes(b"not an image")
    with pytest.raises(InferenceError, match="RuntimeError"):
        runner.run(model, tmp_path / "garbage.mha", tmp_path / "never.mha")
    assert not (tmp_path / "never.mha").exists()
    result = runner.run(model, ct_path, tmp_path / "labels.mha")
    check_labels(tmp_path / "labels.mha", ct_path, result)


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: R running, S sleeping, Z zombie."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, state: str, deadline_s: float = TIMEOUT_S) -> None:
    wait_until(lambda: process_state(pid) == state, deadline_s, every=0.01, what=f"child in state {state}")


def wait_for_exit(pid: int) -> None:
    """Poll until the child can be reaped, leaving the reaping to the runner (WNOWAIT)."""
    wait_until(
        lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None,
        TIMEOUT_S,
        every=0.01,
        what="child exit",
    )


def test_a_child_killed_during_a_job_fails_that_job_and_the_next_completes(
    tmp_path: Path, ct_path: Path, runner: InferenceRunner
) -> None:
    slow = package(tmp_path / "models", [Spin(2, iterations=10**12)], "slow")
    quick = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    runner.run(quick, ct_path, tmp_path / "warm.mha")
    pid = runner.pid
    assert pid is not None
    outcome: list[BaseException] = []

    def job() -> None:
        try:
            runner.run(slow, ct_path, tmp_path / "slow.mha")
        except InferenceError as exc:
            outcome.append(exc)

    wait_for_state(pid, "S")  # idle: asleep in recv() after sending the warm-up's result
    worker = threading.Thread(target=job)
    worker.start()
    wait_for_state(pid, "R")  # awake again only because it has received the job
    os.kill(pid, signal.SIGKILL)
    worker.join(TIMEOUT_S)
    assert [str(e) for e in outcome] == ["inference process died (killed by SIGKILL (out of memory?))"]
    assert runner.pid not in (None, pid)
    result = runner.run(quick, ct_path, tmp_path / "labels.mha")
    check_labels(tmp_path / "labels.mha", ct_path, result)


def test_a_child_that_died_between_jobs_is_replaced(tmp_path: Path, ct_path: Path, runner: InferenceRunner) -> None:
    quick = package(tmp_path / "models", [threshold_model(2, 0.25)], "body")
    runner.run(quick, ct_path, tmp_path / "warm.mha")
    pid = runner.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for_exit(pid)
    result = runner.run(quick, ct_path, tmp_path / "labels.mha")
    check_labels(tmp_path / "labels.mha", ct_path, result)
    assert runner.pid != pid

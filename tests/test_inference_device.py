"""The node says at start where inference runs, and warns when `auto` misses a present GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import structlog
import torch

from ie_gateway.config import InferenceSettings
from ie_gateway.service import report_inference_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_auto_falling_back_to_cpu_beside_a_gpu_device_node_is_a_warning() -> None:
    with structlog.testing.capture_logs() as logs:
        device = report_inference_device(InferenceSettings(device="auto"), ["/dev/nvidia0"])
    assert device == "cpu"
    [info] = [e for e in logs if e["event"] == "inference device"]
    assert info["device"] == "cpu" and info["gpu_device_nodes"] == ["/dev/nvidia0"]
    assert any(e["log_level"] == "warning" and "falls back to the CPU" in e["event"] for e in logs)


def test_no_warning_without_gpu_device_nodes_or_with_cpu_chosen() -> None:
    with structlog.testing.capture_logs() as logs:
        report_inference_device(InferenceSettings(device="auto"), [])
        report_inference_device(InferenceSettings(device="cpu"), ["/dev/nvidia0"])
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_without_gpu_device_nodes_auto_is_the_cpu_and_the_node_does_not_import_torch() -> None:
    # a fresh interpreter: this test's own process has torch loaded already
    code = ("import sys; from ie_gateway.config import InferenceSettings; "
            "from ie_gateway.service import report_inference_device; "
            "print(report_inference_device(InferenceSettings(device='auto'), []), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[-1].split() == ["cpu", "False"]  # after the "inference device" log line

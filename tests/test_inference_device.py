"""The node says at start where inference runs, and warns when `auto` misses a present GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import torch

from ie_gateway.config import InferenceSettings
from ie_gateway.service import device_check, nvidia_pci_gpus, report_inference_device


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
            "from ie_gateway.service import device_check, nvidia_pci_gpus, report_inference_device; "
            "print(report_inference_device(InferenceSettings(device='auto'), []), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[-1].split() == ["cpu", "False"]  # after the "inference device" log line


def _sysfs(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    for address, (vendor, klass) in devices.items():
        device = root / "bus/pci/devices" / address
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(klass + "\n")
    return root


def test_nvidia_cards_on_the_pci_bus_are_found_without_a_driver(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, {"0000:00:02.0": ("0x8086", "0x030000"),  # an Intel display
                              "0000:3b:00.0": ("0x10de", "0x030200"),  # an NVIDIA 3D controller
                              "0000:3b:00.1": ("0x10de", "0x040300")})  # its audio function
    assert nvidia_pci_gpus(sysfs) == ["0000:3b:00.0"]
    assert nvidia_pci_gpus(tmp_path / "absent") == []


def test_a_gpu_without_device_nodes_is_a_start_up_warning_and_a_readyz_detail() -> None:
    settings = InferenceSettings(device="auto")
    with structlog.testing.capture_logs() as logs:
        device = report_inference_device(settings, [], ["0000:3b:00.0"])
    assert device == "cpu"
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert "no /dev/nvidia* node is visible" in warning["what_to_do"]
    check = device_check(settings, device, [], ["0000:3b:00.0"])
    assert check.ok  # the CPU works: the node stays ready, monitoring reads the detail
    assert check.detail.startswith("cpu; GPU present but unused: an NVIDIA GPU is on the PCI bus")


def test_a_gpu_the_admin_turned_off_is_a_readyz_detail_and_no_gpu_is_just_the_device() -> None:
    chosen = device_check(InferenceSettings(device="cpu"), "cpu", ["/dev/nvidia0"], [])
    assert chosen.detail == "cpu; GPU present but unused: inference.device is cpu although this machine has an NVIDIA GPU"
    assert device_check(InferenceSettings(device="auto"), "cpu", [], []).detail == "cpu"
    assert device_check(InferenceSettings(device="auto"), "cuda", ["/dev/nvidia0"], []).detail == "cuda"

"""Inference benchmark: a synthetic 200 x 512² thorax CT through the production runner.

Prints the time of each stage (resample, sliding windows and the folds' forward passes, resample
back, post-processing), the total, and the child process's peak RSS, for a cold job (the child's
first, just after it loaded the folds: first-call costs such as oneDNN's set-up) and a warm one,
on the CPU and, when torch sees one, on CUDA.

CPU time: for every job, the inference child's user and system CPU seconds and its minor page
faults (read from ``/proc/PID/stat`` around the job), and at the end ``resource.getrusage`` of
the finished child (RUSAGE_CHILDREN). On a machine shared with other work, user + sys CPU seconds
are steadier than wall time: the figures print both.

``--speed`` runs the model's speed settings against the full setting on the same CT and prints,
for each, the time, CPU seconds and agreement with the full setting (voxels and Dice per
structure): for a native model overlap 0.5 (nnU-Net's tile step 0.5) is the full setting, against
the shipped one, no overlap and mirroring along z; for an nnU-Net package step 0.5 with mirroring
(nnU-Net's defaults) against no mirroring and step 0.75.

Model: the repository's ``models/demo-thorax`` (its one version) when it is there; otherwise
(or with ``--stand-in``) a random-weight TorchScript U-Net of the demo model's size and input
contract (3 folds, widths 8-16-32-64, 2.5 x 2.5 x 3 mm, patch 48 x 208 x 208, overlap 0.25), so
the figures mean the same work. Run: ``.venv/bin/python bench/infer.py [--slices 200 --size 512]``.

``--model NAME`` benchmarks another installed package of ``models/``. For an nnU-Net v2 or MONAI
package it also runs the framework's own command line on the same CT written as NIfTI, with
the same folds and test-time augmentation (``nnUNetv2_predict_from_modelfolder -npp 1 -nps 1``,
its fewest worker processes; ``python -m monai.bundle run``), and prints both times, peak
memories (the largest process of each: the node's inference child, the command or one of its
workers) and the node's ratio to the framework (cold: the child loads the model; warm: an
nnU-Net model is resident, a MONAI bundle's workflow is built again). The command line's time includes starting Python and importing the framework,
which the node's child does once at start-up, before any job.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ie_gateway.config import load_config
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom
from ie_gateway.infer.manifest import load_manifest
from ie_gateway.infer.registry import ModelVersion, Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.infer.signing import trusted_keys
from ie_gateway.vocab import ModelFormat

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-thorax"
STAGES = ("resample", "windows", "forward", "resample_back", "postprocess", "total")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.01)
    )


class StandIn(nn.Module):
    """A four-level 3D U-Net like the demo model's, with random weights."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), classes: int = 6) -> None:
        super().__init__()
        ins = [1, *widths]
        self.down = nn.ModuleList(
            nn.Sequential(_block(ins[i], ins[i + 1]), _block(ins[i + 1], ins[i + 1]))
            for i in range(len(widths))
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
            for i in range(len(widths) - 1)
        )
        self.merge = nn.ModuleList(
            nn.Sequential(_block(2 * widths[i], widths[i]), _block(widths[i], widths[i]))
            for i in range(len(widths) - 1)
        )
        self.head = nn.Conv3d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for level, down in enumerate(self.down):
            if level:
                x = F.max_pool3d(x, 2)
            x = down(x)
            skips.append(x)
        skips.pop()
        for i in range(len(self.up) - 1, -1, -1):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits


def stand_in_package(folder: Path, folds: int = 3) -> ModelVersion:
    folder.mkdir(parents=True)
    entries = []
    for fold in range(folds):
        torch.manual_seed(fold)
        path = folder / f"fold{fold}.pt"
        traced = torch.jit.trace(StandIn().eval(), torch.zeros(1, 1, 16, 32, 32))
        torch.jit.freeze(traced).save(str(path))
        entries.append({"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {
        "name": "stand-in",
        "version": "1",
        "description": "random weights, demo-thorax's size and input contract (benchmark only)",
        "structures": [
            {
                "label": i + 1,
                "name": name,
                "color": [0, 0, 0],
                "interpreted_type": "ORGAN",
                "postprocess": {"largest_component": True, "fill_holes": True},
            }
            for i, name in enumerate(STRUCTURES)
        ],
        "input": {
            "spacing_mm": [2.5, 2.5, 3.0],
            "orientation": "LPS",
            "intensity": {"window": [-1000, 1000]},
            "patch_size": [48, 208, 208],
            "overlap": 0.25,
            "batch_size": 1,
        },
        "folds": entries,
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    loaded = load_manifest(folder)
    return ModelVersion(loaded.name, loaded.version, folder, loaded)


def write_ct(folder: Path, seed: int, slices: int, size: int) -> tuple[Path, np.ndarray]:
    """The phantom's CT as ``ct.mha`` in ``folder``, and its true label map (z, y, x)."""
    phantom = make_phantom(seed, slices=slices, size=size)
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
    image.SetOrigin(phantom.origin)
    sitk.WriteImage(image, str(folder / "ct.mha"))
    return folder / "ct.mha", phantom.labels


def dice_line(labels_path: Path, truth: np.ndarray) -> str:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    scores = []
    for label, name in enumerate(STRUCTURES, start=1):
        got, want = labels == label, truth == label
        total = int(got.sum()) + int(want.sum())
        scores.append(f"{name} {2 * int((got & want).sum()) / total if total else 1.0:.3f}")
    return ", ".join(scores)


def cpu_of(pid: int | None) -> tuple[float, float, int]:
    """User and system CPU seconds and minor page faults of a running process, all threads."""
    if pid is None:
        return 0.0, 0.0, 0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # after the command name: state is field 3; minflt 10, utime 14, stime 15 (proc(5))
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def timed_run(
    runner: InferenceRunner, model: ModelVersion, ct: Path, labels: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """One job, with the child's wall, user and sys seconds and minor faults for it (the child
    must hold the model already: ``runner.verify`` it first, so loading is not counted)."""
    user0, sys0, faults0 = cpu_of(runner.pid)
    mark = time.perf_counter()
    result = runner.run(model, ct, labels)
    wall = time.perf_counter() - mark
    user1, sys1, faults1 = cpu_of(runner.pid)
    return result, {"wall": wall, "user": user1 - user0, "sys": sys1 - sys0, "faults": faults1 - faults0}


def cpu_line(label: str, cpu: dict[str, float]) -> str:
    share = cpu["sys"] / (cpu["user"] + cpu["sys"]) if cpu["user"] + cpu["sys"] else 0.0
    return (
        f"{label:<14}wall {cpu['wall']:7.2f} s  user {cpu['user']:7.2f} s  sys {cpu['sys']:6.2f} s "
        f"(sys {share:.0%})  minor faults {cpu['faults']:>9.0f}"
    )


def bench_device(
    device: str, model: ModelVersion, ct: Path, truth: np.ndarray, out: Path, repeat: int
) -> None:
    cpu = []
    with InferenceRunner(3600, device=device, log_level=None) as runner:
        runner.verify(model)  # the child starts and loads the folds; "cold" is its first job
        results = []
        for i in range(repeat + 1):
            result, figures = timed_run(runner, model, ct, out / f"labels-{device}-{i}.mha")
            results.append(result)
            cpu.append(figures)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib = usage.ru_maxrss / 1024
    print(f"\n{device}: {model.spec}, {results[0].folds} folds, {results[0].windows} windows")
    print(
        f"{'stage':<14}"
        + "".join(f"{'cold' if i == 0 else f'warm{i}':>10}" for i in range(len(results)))
    )
    for stage in STAGES:
        cells = [r.timings_s.get(stage) for r in results]
        print(
            f"{stage:<14}"
            + "".join(f"{c:>9.2f}s" if c is not None else f"{'-':>10}" for c in cells)
        )
    print(f"peak RSS of the inference process (largest so far): {peak_mib:.0f} MiB")
    print("inference child's CPU, per job (model loaded and verified before):")
    for i, figures in enumerate(cpu):
        print("  " + cpu_line("cold" if i == 0 else f"warm{i}", figures))
    print(
        f"  finished children in all (getrusage): user {usage.ru_utime:.2f} s, sys {usage.ru_stime:.2f} s, "
        f"minor faults {usage.ru_minflt}"
    )
    print("volumes cc: " + ", ".join(f"{k} {v:.0f}" for k, v in results[-1].volumes_cc.items()))
    print(
        "Dice vs the phantom's labels: " + dice_line(out / f"labels-{device}-{repeat}.mha", truth)
    )


def framework_command(model: ModelVersion, in_dir: Path, out_dir: Path, device: str) -> list[str]:
    """The framework's own inference command for ``model`` on the NIfTI files in ``in_dir``."""
    if model.manifest.format is ModelFormat.NNUNETV2:
        settings = model.manifest.nnunet
        assert settings is not None
        folds = [f.file.split("/", 1)[0].removeprefix("fold_") for f in model.manifest.folds]
        return [
            str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"),
            "-i", str(in_dir), "-o", str(out_dir), "-m", str(model.path), "-f", *folds,
            "-step_size", str(settings.step_size), "-chk", settings.checkpoint, "-device", device,
            "-npp", "1", "-nps", "1", "--disable_progress_bar",
            *([] if settings.mirroring else ["--disable_tta"]),
        ]
    settings = model.manifest.monai
    config = model.path / (settings.config if settings else "configs/inference.json")
    meta = model.path / (settings.meta if settings else "configs/metadata.json")
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config),
        "--meta_file", str(meta), "--bundle_root", str(model.path), "--dataset_dir", str(in_dir),
        "--output_dir", str(out_dir),
    ]


def bench_framework(device: str, model: ModelVersion, ct: Path, out: Path, repeat: int) -> None:
    """The node's runner against the framework's command line on the same CT, same settings."""
    with InferenceRunner(3600, device=device, log_level=None) as runner:
        times = []
        for i in range(repeat + 1):
            mark = time.perf_counter()
            runner.run(model, ct, out / f"labels-{device}-{i}.mha")
            times.append(time.perf_counter() - mark)
    node_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    in_dir, out_dir = out / f"nifti-in-{device}", out / f"nifti-out-{device}"
    in_dir.mkdir()
    name = "case_0000.nii.gz" if model.manifest.format is ModelFormat.NNUNETV2 else "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(in_dir / name))
    mark = time.perf_counter()
    proc = subprocess.Popen(framework_command(model, in_dir, out_dir, device),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    cli_s = time.perf_counter() - mark
    if status != 0:
        raise SystemExit(f"the framework's command failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    cli_mib = usage.ru_maxrss / 1024
    [written] = [p for p in out_dir.rglob("*.nii.gz")]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labels-{device}-{repeat}.mha")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    folds = len(model.manifest.folds)
    print(f"\n{device}: {model.spec} ({model.manifest.format}), {folds} folds")
    print(f"node, cold job (loads the model): {times[0]:8.2f} s   ratio to framework {times[0] / cli_s:.2f}")
    for i, t in enumerate(times[1:], 1):
        print(f"node, warm job {i} (child started): {t:8.2f} s   ratio to framework {t / cli_s:.2f}")
    print(f"framework's command line:         {cli_s:8.2f} s")
    print(f"peak RSS: node's inference process {node_mib:.0f} MiB, framework's command "
          f"{cli_mib:.0f} MiB, ratio {node_mib / cli_mib:.2f}")
    print(f"voxel agreement node vs framework: {float((ours == theirs).mean()):.6f}")


def variant(model: ModelVersion, tag: str, **changes: Any) -> ModelVersion:
    """``model`` with other speed settings (``input`` for native, ``nnunet`` for nnU-Net); a
    version name of its own, so the child holds each variant as a model of its own."""
    manifest = model.manifest
    if manifest.format is ModelFormat.NNUNETV2:
        assert manifest.nnunet is not None
        manifest = manifest.model_copy(update={"nnunet": manifest.nnunet.model_copy(update=changes)})
    else:
        manifest = manifest.model_copy(update={"input": manifest.contract.model_copy(update=changes)})
    return ModelVersion(model.name, f"{model.version}+{tag}", model.path, manifest)


def speed_variants(model: ModelVersion) -> list[tuple[str, ModelVersion]]:
    """(label, model) pairs; the first is the full setting the others are compared with."""
    if model.manifest.format is ModelFormat.NNUNETV2:
        return [
            ("step 0.5, mirroring (full)", variant(model, "full", step_size=0.5, mirroring=True)),
            ("step 0.5, no mirroring", variant(model, "nomirror", step_size=0.5, mirroring=False)),
            ("step 0.75, mirroring", variant(model, "step75", step_size=0.75, mirroring=True)),
            ("step 0.75, no mirroring", variant(model, "fast", step_size=0.75, mirroring=False)),
        ]
    if model.manifest.format is not ModelFormat.NATIVE:
        raise SystemExit("--speed: a native or nnU-Net v2 package (a MONAI bundle sets its own inferer)")
    shipped = model.manifest.contract
    return [
        ("overlap 0.5 (full)", variant(model, "full", overlap=0.5)),
        (f"overlap {shipped.overlap:g} (shipped)", variant(model, "shipped")),
        ("overlap 0", variant(model, "nooverlap", overlap=0.0)),
        ("overlap 0.5, mirror z", variant(model, "mirrorz", overlap=0.5, mirror_axes=(0,))),
    ]


def bench_speed(device: str, model: ModelVersion, ct: Path, out: Path) -> None:
    """Each speed setting's time, CPU seconds and agreement with the full setting."""
    variants = speed_variants(model)
    rows = []
    with InferenceRunner(3600, device=device, log_level=None) as runner:
        for label, version in variants:
            path = out / f"speed-{device}-{version.version}.mha"
            runner.verify(version)
            result, figures = timed_run(runner, version, ct, path)
            rows.append((label, path, figures, result.get("windows")))
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(rows[0][1])))
    names = [s.name for s in model.manifest.structures]
    print(f"\n{device}: speed settings of {model.spec}, agreement with {rows[0][0]}")
    for label, path, figures, windows in rows:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        dice = []
        for value, name in enumerate(names, start=1):
            a, b = labels == value, full == value
            total = int(a.sum()) + int(b.sum())
            dice.append(f"{name} {2 * int((a & b).sum()) / total if total else 1.0:.4f}")
        cpu_s = figures["user"] + figures["sys"]
        print(
            f"  {label:<28} windows {windows or '-':>4}  wall {figures['wall']:7.2f} s  "
            f"user+sys {cpu_s:7.2f} s ({cpu_s / (rows[0][2]['user'] + rows[0][2]['sys']):.2f}x full)  "
            f"voxels agreeing {float((labels == full).mean()):.6f}"
        )
        print(f"  {'':<28} Dice vs full: {', '.join(dice)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=10_011, help="phantom (>= 10000: held out)")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="warm jobs after the cold one")
    parser.add_argument("--stand-in", action="store_true", help="random U-Net even if demo exists")
    parser.add_argument("--model", help="NAME or NAME@VERSION of a package in --models-dir")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--speed", action="store_true", help="speed settings against the full one")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="only this device")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "gateway.yaml",
                        help="the node config whose trusted_keys a package must be signed by")
    args = parser.parse_args(argv)
    keys = trusted_keys(load_config(args.config))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            model = Registry(args.models_dir, tmp / "state.json", keys=keys).resolve(args.model)
        elif any(DEMO.glob("*/model.yaml")) and not args.stand_in:
            model = Registry(REPO / "models", tmp / "state.json", keys=keys).resolve("demo-thorax")
        else:
            model = stand_in_package(tmp / "stand-in" / "1")
        mark = time.perf_counter()
        ct, truth = write_ct(tmp, args.seed, args.slices, args.size)
        print(
            f"CT {args.slices} x {args.size}²: "
            f"phantom written in {time.perf_counter() - mark:.1f} s"
        )
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in [args.device] if args.device else devices:
            if args.speed:
                bench_speed(device, model, ct, tmp)
            elif model.manifest.format is ModelFormat.NATIVE:
                bench_device(device, model, ct, truth, tmp, args.repeat)
            else:
                bench_framework(device, model, ct, tmp, args.repeat)


if __name__ == "__main__":
    main()

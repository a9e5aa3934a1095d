"""The GPU path, ready to prove: four models through a node, each from the series complete to
its RT-STRUCT stored at the TPS, with the figures a lent CUDA machine has minutes to give.

Run by ``bench/gpu.sh`` (it installs the repository first where needed). Cases, each on a
synthetic 200 x 512² thorax CT sent by C-STORE to an in-process node (``--device cuda`` by
default) with a stand-in TPS on loopback:

1. ``native``: the repository's demo-thorax (three TorchScript folds, the node's ensemble);
2. ``nnunet-demo``: the repository's demo-thorax-nnunet (one fold, nnU-Net's predictor);
3. ``monai``: a MONAI bundle laid out as the model zoo's CT bundles (spleen_ct_segmentation's
   UNet 16-256 with residual units, 1.5 x 1.5 x 2 mm, 96³ sliding windows), random weights;
4. ``nnunet-5fold``: five folds of nnU-Net's default 3d_fullres architecture for a thorax CT
   (PlainConvUNet, 6 stages of 32-320 features, patch 80 x 160 x 160 at 2.5 x 0.78 x 0.78 mm),
   random weights; test-time mirroring off (``--disable_tta``: 196 windows x 5 folds instead of
   x 40 keeps the script within its minutes; ``--mirroring`` turns it on, node and command alike).

Per case: seconds from series complete to the RT-STRUCT stored at the TPS, split into routing,
the inference stage (of which volume loading and the model's own time) and RT-STRUCT written
plus delivered; the peak GPU memory (the device's memory in use sampled by nvidia-smi every
100 ms, less what was in use before); for the nnU-Net cases ``nnUNetv2_predict_from_modelfolder``
on the same CT, folds, step and mirroring (its time includes starting Python and importing
nnU-Net, which the node's inference child did before the job), the node's ratio to it, and the
voxel agreement of the two label maps (the command's post-processed as the package's model.yaml
says, as the node's is). Models are imported and verified (loaded into the
inference child) before their CT is sent, as an installed model is on a running node.

``--tiny``: the same script on the CPU, so CI keeps it working: a 24 x 64² CT, a small stand-in
for the native demo, the nnU-Net demo without mirroring, the bundle and the five folds with a
few features each, and nnU-Net's command for the five folds only. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
import yaml
from pydicom.uid import RTStructureSetStorage, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from infer import framework_command, stand_in_package

from ie_gateway.config import load_config
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.demo.run import send_series
from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.postprocess import postprocess_labels
from ie_gateway.infer.registry import ModelVersion, registry_for
from ie_gateway.infer.signing import sign_model
from ie_gateway.receive import VERIFICATION
from ie_gateway.service import Service
from ie_gateway.store import JobState
from tests.peers import free_port  # a port of its own under pytest-xdist (test_gpu_bench)

CALLER, TPS = "GPU_BENCH", "BENCH_TPS"
FINAL = {JobState.DELIVERED, JobState.FAILED, JobState.REFUSED, JobState.UNROUTED, JobState.NEEDS_REVIEW}
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: the repository's demo publisher (keys/README.md): the bench signs the packages it builds with
#: it, as the training side publishes them, and its node trusts it, as the demo config does
DEMO_KEY = REPO / "keys" / "demo-only-publisher"
DEMO_PUB = REPO / "keys" / "demo-only-publisher.pub"


@dataclass
class Case:
    name: str
    model: str  # name in the bench's models folder
    nnunet: bool = False
    figures: dict[str, Any] = field(default_factory=dict)


# --- model packages -------------------------------------------------------------------------


def native_package(work: Path, tiny: bool) -> Path:
    if not tiny:
        return REPO / "models" / "demo-thorax" / "3"
    version = stand_in_package(work / "native-tiny" / "1", folds=3)
    manifest = yaml.safe_load((version.path / "model.yaml").read_text())
    manifest["input"].update({"patch_size": [16, 32, 32], "spacing_mm": [6.0, 6.0, 6.0], "batch_size": 2})
    (version.path / "model.yaml").write_text(yaml.safe_dump({**manifest, "name": "native"}, sort_keys=False))
    return version.path


def edit_manifest(folder: Path, nnunet: dict[str, Any] | None = None) -> None:
    """What an admin edits in a written model.yaml before importing: every structure kept to its
    largest piece, holes filled (random weights draw noise: one outline per structure, not
    thousands), and nnU-Net settings."""
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    for structure in manifest["structures"]:
        structure["postprocess"].update({"largest_component": True, "fill_holes": True})
    if nnunet:
        manifest["nnunet"].update(nnunet)
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def without_mirroring(package: Path, folder: Path) -> Path:
    """A copy of an nnU-Net package whose model.yaml turns test-time mirroring off."""
    shutil.copytree(package, folder)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["nnunet"]["mirroring"] = False
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def nnunet_fullres_package(folder: Path, tiny: bool, mirroring: bool, folds: int = 5) -> Path:
    """Five folds of nnU-Net's default 3d_fullres PlainConvUNet for a thorax CT, random weights,
    in the layout of a trained-model folder (the demo's dataset.json, plans and checkpoint keys)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    template = REPO / "models" / "demo-thorax-nnunet" / "1"
    folder.mkdir(parents=True)
    shutil.copyfile(template / "dataset.json", folder / "dataset.json")
    plans = json.loads((template / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    if tiny:
        stages, features, patch, spacing = 3, [4, 8, 16], [16, 32, 32], [6.0, 6.0, 6.0]
        strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
        kernels = [[3, 3, 3]] * 3
    else:  # what nnU-Net's planner gives a thorax CT at 2.5 x 0.78 x 0.78 mm
        stages, features, patch, spacing = 6, [32, 64, 128, 256, 320, 320], [80, 160, 160], [2.5, 0.78125, 0.78125]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * 5
    config.update({"patch_size": patch, "spacing": spacing, "median_image_size_in_voxels": patch})
    config["architecture"]["arch_kwargs"].update(
        {
            "n_stages": stages,
            "features_per_stage": features,
            "kernel_sizes": kernels,
            "strides": strides,
            "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1),
        }
    )
    plans["configurations"] = {"3d_fullres": config}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    checkpoint = torch.load(template / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    arch = config["architecture"]
    for fold in range(folds):
        torch.manual_seed(fold)
        network = get_network_from_plans(
            arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 6, allow_init=True
        )
        (folder / f"fold_{fold}").mkdir()
        weights = {**checkpoint, "network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer"}
        torch.save(weights, folder / f"fold_{fold}" / "checkpoint_final.pth")
    describe_package(folder, "nnunet-5fold", "1", "nnU-Net 3d_fullres, default architecture, random weights")
    edit_manifest(folder, {"mirroring": mirroring})
    return folder


def monai_package(folder: Path, tiny: bool) -> Path:
    """A bundle as the zoo's CT bundles lay it out, MONAI's UNet with random weights."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNet

    from tests.monai_bundles import inference_config, metadata

    channels = [4, 8, 16] if tiny else [16, 32, 64, 128, 256]
    network = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 2,
        "norm": "batch",
    }
    config = inference_config((6.0, 6.0, 6.0) if tiny else (1.5, 1.5, 2.0))
    config["network_def"] = {"_target_": "UNet", **network}
    roi = [32, 32, 32] if tiny else [96, 96, 96]
    config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4, "overlap": 0.5}
    evaluator = config["evaluator"]
    assert isinstance(evaluator, dict)
    evaluator["amp"] = "$torch.cuda.is_available()"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    ConfigParser.export_config_file(config, str(folder / "configs" / "inference.json"), indent=2)
    ConfigParser.export_config_file(metadata(), str(folder / "configs" / "metadata.json"), indent=2)
    torch.manual_seed(0)
    torch.save(UNet(**network).state_dict(), folder / "models" / "model.pt")  # type: ignore[arg-type]
    describe_package(folder, "monai", "1", "zoo-style CT bundle, MONAI UNet, random weights")
    edit_manifest(folder)
    return folder


def packages(work: Path, tiny: bool, mirroring: bool) -> dict[str, Path]:
    """Case name -> package folder to import."""
    demo = REPO / "models" / "demo-thorax-nnunet" / "1"
    folders = {
        "native": native_package(work, tiny),
        "nnunet-demo": without_mirroring(demo, work / "nnunet-demo") if tiny else demo,
        "monai": monai_package(work / "monai-bundle", tiny),
        "nnunet-5fold": nnunet_fullres_package(work / "nnUNetTrainer__nnUNetPlans__3d_fullres", tiny, mirroring),
    }
    for folder in folders.values():
        if folder.is_relative_to(work):  # built or edited here; the repository's own are signed
            sign_model(folder, DEMO_KEY)
    return folders


# --- the node and the TPS -------------------------------------------------------------------


class StandInTPS:
    """A C-STORE SCP that notes when each RT-STRUCT arrives, by series description."""

    def __init__(self) -> None:
        self.port = free_port()
        self.rtstruct_at: dict[str, float] = {}
        ae = AE(ae_title=TPS)
        for context in (VERIFICATION, RTStructureSetStorage, SegmentationStorage):
            ae.add_supported_context(context)
        handlers = [(evt.EVT_C_STORE, self._store)]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server: ThreadedAssociationServer = server

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        if ds.SOPClassUID == RTStructureSetStorage:
            self.rtstruct_at.setdefault(str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID), time.time())
        return 0x0000


def node_config(work: Path, cases: list[Case], tps_port: int, device: str) -> Path:
    """gateway.yaml and routing.yaml of the bench's node: one rule per case, by series description."""
    (work / "models").mkdir(exist_ok=True)
    rules = [
        {
            "name": case.name,
            "match": {"Modality": "CT", "SeriesDescription": case.name},
            "model": case.model,
            "outputs": ["rtstruct", "seg"],
            "send_to": [TPS],
            "review": "flag",  # random weights fail plausibility checks: send, marked, anyway
        }
        for case in cases
    ]
    (work / "routing.yaml").write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    config = {
        "node": {"bind": "127.0.0.1", "port": free_port(), "allowed_callers": [{"ae_title": CALLER}]},
        "storage": {"root": str(work / "var")},
        "http": {"enabled": False},
        "series": {"stable_after_s": 30, "sweep_every_s": 0.1},  # ImagesInAcquisition completes it
        "routing_file": "routing.yaml",
        "models_dir": str(work / "models"),
        "trusted_keys": [{"name": "demo", "public_key": str(DEMO_PUB)}],
        "destinations": {TPS: {"ae_title": TPS, "host": "127.0.0.1", "port": tps_port}},
        "delivery": {"base_s": 1, "every_s": 0.2},
        "inference": {"device": device, "timeout_s": 1800},
        "log_level": "warning",
    }
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class GpuMemory:
    """Peak device memory in use while a block runs, from nvidia-smi's 100 ms samples (None
    without nvidia-smi or on the CPU): the node's child and nnU-Net's command measured alike."""

    def __init__(self, device: str) -> None:
        self.enabled = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.peak_mib: float | None = None

    def __enter__(self) -> Self:
        if not self.enabled:
            return self
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        self._base = float(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])
        self._proc = subprocess.Popen([*query, "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self._samples: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():
                self._samples.append(float(line.split()[0]))

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._proc.terminate()
            self._reader.join(5)
            self.peak_mib = max(self._samples, default=self._base) - self._base


def run_case(service: Service, tps: StandInTPS, case: Case, ct: Any, work: Path, seed: int, device: str) -> None:
    folder = work / "ct" / case.name
    files = write_ct_series(
        ct, folder, seed=seed, extra={"SeriesDescription": case.name, "ImagesInAcquisition": ct.hu.shape[0]}
    )
    frame = str(pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID)
    assert service.runner is not None
    service.runner.verify(service.registry.resolve(case.model))  # installed and loaded, as on a node
    before = {j.id for j in service.store.index.jobs()}
    with GpuMemory(device) as memory:
        send_series(files, service.cfg.node.port, "IE_GATEWAY", CALLER)
        deadline = time.monotonic() + 1800
        job = None
        while time.monotonic() < deadline:
            new = [j for j in service.store.index.jobs() if j.id not in before]
            job = new[0] if new else None
            if job is not None and (frame in tps.rtstruct_at or job.state in FINAL - {JobState.DELIVERED}):
                break
            time.sleep(0.05)  # poll interval while the node works
    if job is None or frame not in tps.rtstruct_at:
        state = service.store.index.job(job.id) if job else None
        case.figures = {"state": state.state.value if state else "never seen", "reason": state.reason if state else ""}
        return
    index = service.store.index
    at = {s: index.entered_at(job.id, s) for s in (JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING)}
    inferred = index.entered_at(job.id, JobState.INFERRED)
    job = index.job(job.id)
    timings = job.detail.timings_s
    stored = tps.rtstruct_at[frame]
    case.figures = {
        "state": "rtstruct stored",
        "complete_to_rtstruct_s": stored - (at[JobState.COMPLETE] or stored),
        "route_s": (at[JobState.ROUTED] or 0) - (at[JobState.COMPLETE] or 0),
        "infer_stage_s": (inferred or 0) - (at[JobState.INFERRING] or 0),
        "volume_s": timings.get("volume", 0.0),
        "model_s": timings.get("total", 0.0),
        "rtstruct_s": stored - (inferred or stored),
        "peak_gpu_mib": memory.peak_mib,
        "labels": service.store.results / f"job-{job.id}" / "labels-0.mha",
        "ct": service.store.results / f"job-{job.id}" / "ct.mha",
    }


def compare_nnunet(case: Case, model: ModelVersion, work: Path, device: str) -> None:
    """nnUNetv2_predict_from_modelfolder on the same CT and folds: time, memory, agreement."""
    in_dir, out_dir = work / f"cli-in-{case.name}", work / f"cli-out-{case.name}"
    in_dir.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(case.figures["ct"])), str(in_dir / "case_0000.nii.gz"))
    with GpuMemory(device) as memory:
        mark = time.perf_counter()
        command = framework_command(model, in_dir, out_dir, device)
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        cli_s = time.perf_counter() - mark
    if done.returncode != 0:
        case.figures["cli"] = f"failed: {done.stderr.strip().splitlines()[-1:]}"
        return
    [written] = out_dir.rglob("*.nii.gz")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(case.figures["labels"])))
    image = sitk.ReadImage(str(written))
    theirs = sitk.GetArrayFromImage(image).astype(np.uint8)
    # the node post-processes as model.yaml says; compare the networks' answers, not that
    postprocess_labels(theirs, model.manifest.structures, float(np.prod(image.GetSpacing())) / 1000.0)
    case.figures.update(
        {
            "cli_s": cli_s,
            "cli_peak_gpu_mib": memory.peak_mib,
            "ratio_infer_stage": case.figures["infer_stage_s"] / cli_s,
            "agreement": float(np.mean(ours == theirs)) if ours.shape == theirs.shape else float("nan"),
        }
    )


def report(cases: list[Case], device: str, slices: int, size: int) -> None:
    print(f"\n{device}: {slices} x {size}² CT, series complete -> RT-STRUCT stored at the TPS (seconds)")
    head = f"{'case':<14}{'total':>8}{'route':>8}{'infer':>8}{'volume':>8}{'model':>8}{'rtstruct':>9}{'GPU MiB':>9}"
    print(head)
    for case in cases:
        f = case.figures
        if f.get("state") != "rtstruct stored":
            print(f"{case.name:<14} {f.get('state')}: {f.get('reason')}")
            continue
        gpu = f"{f['peak_gpu_mib']:.0f}" if f["peak_gpu_mib"] is not None else "-"
        print(
            f"{case.name:<14}{f['complete_to_rtstruct_s']:8.2f}{f['route_s']:8.2f}{f['infer_stage_s']:8.2f}"
            f"{f['volume_s']:8.2f}{f['model_s']:8.2f}{f['rtstruct_s']:9.2f}{gpu:>9}"
        )
    for case in cases:
        f = case.figures
        if "cli_s" in f:
            gpu = f"{f['cli_peak_gpu_mib']:.0f} MiB" if f["cli_peak_gpu_mib"] is not None else "-"
            print(
                f"{case.name}: nnUNetv2_predict_from_modelfolder {f['cli_s']:.2f} s (peak GPU {gpu}); node's "
                f"inference stage / command: {f['ratio_infer_stage']:.2f}; voxels agreeing {f['agreement']:.6f}"
            )
        elif "cli" in f:
            print(f"{case.name}: nnUNetv2_predict_from_modelfolder {f['cli']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny CT and models: proves the script, not the GPU")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, or cpu with --tiny")
    parser.add_argument("--slices", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--cases", nargs="*", help="only these (native nnunet-demo monai nnunet-5fold)")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring for the five folds")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --tiny / --device cpu")
    slices, size = args.slices or (24 if args.tiny else 200), args.size or (64 if args.tiny else 512)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        folders = packages(work, args.tiny, args.mirroring)
        cases = [
            Case(name, name, nnunet=name.startswith("nnunet"))
            for name in folders
            if not args.cases or name in args.cases
        ]
        tps = StandInTPS()
        config = node_config(work, cases, tps.port, device)
        registry = registry_for(load_config(config))  # checksums now; loaded in the child per case
        for case in cases:
            case.model = registry.import_version(folders[case.name]).spec
        cfg = load_config(node_config(work, cases, tps.port, device))
        service = Service(cfg)
        service.start()
        try:
            print(f"models imported in {time.monotonic() - started:.1f} s", flush=True)
            ct = make_phantom(2026, slices=slices, size=size, pixel_mm=0.98 * 512 / size)
            for seed, case in enumerate(cases, start=7000):
                run_case(service, tps, case, ct, work, seed, device)
                print(f"{case.name}: {case.figures.get('state')}", flush=True)
                if case.nnunet and "labels" in case.figures and not (args.tiny and case.name == "nnunet-demo"):
                    compare_nnunet(case, service.registry.resolve(case.model), work, device)
        finally:
            service.stop()
            tps.server.shutdown()
        report(cases, device, slices, size)
    print(f"whole script: {time.monotonic() - started:.1f} s")
    return 0 if all(c.figures.get("state") == "rtstruct stored" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())

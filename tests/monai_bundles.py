"""A small MONAI bundle built with MONAI's own API, laid out as the model zoo lays bundles out.

The inference config follows the zoo's CT segmentation bundles (spleen_ct_segmentation and its
kin): LoadImaged → EnsureChannelFirstd → Orientationd(RAS) → Spacingd → ScaleIntensityRanged,
a SlidingWindowInferer, then softmax, Invertd back to the image's own grid, argmax and
SaveImaged; weights come in through a CheckpointLoader handler from ``models/model.pt``. The
network is MONAI's ``Convolution`` block (1x1x1) with set weights whose arg-max is a threshold
model on the scaled intensity: background below -940 HU, lungs up to -300 HU, body above. Its
answer is crude but deterministic and smooth enough to contour, which is all a comparison of
the node against ``python -m monai.bundle run`` needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Convolution

CHANNEL_DEF = {"0": "background", "1": "Body", "2": "Lungs"}
NETWORK = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "kernel_size": 1,
           "conv_only": True}
# logits per channel = w * x + b on x in [0, 1] (HU -1000..1000): lines that cross at x = 0.03
# (background | lungs) and x = 0.35 (lungs | body)
WEIGHTS = (0.0, 80.0, 40.0)
BIASES = (0.0, -15.2, -1.2)


def inference_config(pixdim: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> dict[str, object]:
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "monai.networks.blocks.Convolution", **NETWORK},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 1000,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32],
                    "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "output_postfix": "seg"},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "strict": True}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers",
                      "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(channel_def: dict[str, str] | None = None) -> dict[str, object]:
    channels = channel_def or CHANNEL_DEF
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "name": "toy_ct_segmentation",
        "task": "body and lungs on CT (untrained test bundle)",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                 "num_channels": 1, "spatial_shape": [32, 32, 32],
                                 "dtype": "float32", "value_range": [0, 1]}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": len(channels), "spatial_shape": [32, 32, 32],
                                 "dtype": "float32", "value_range": [0, 1],
                                 "channel_def": channels}},
        },
    }


def write_bundle(folder: Path, channel_def: dict[str, str] | None = None) -> Path:
    """``folder/configs/{inference,metadata}.json`` and ``folder/models/model.pt``; return it."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    ConfigParser.export_config_file(inference_config(), str(folder / "configs" / "inference.json"), indent=2)
    ConfigParser.export_config_file(metadata(channel_def), str(folder / "configs" / "metadata.json"), indent=2)
    network = Convolution(**NETWORK)  # type: ignore[arg-type]
    with torch.no_grad():
        network.conv.weight.copy_(torch.tensor(WEIGHTS).reshape(3, 1, 1, 1, 1))
        network.conv.bias.copy_(torch.tensor(BIASES))
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder

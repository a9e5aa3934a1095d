"""The MONAI bundle allow-list: what a config may instantiate and evaluate without allow_code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ie_gateway.errors import CodeNotAllowed
from ie_gateway.infer.bundle_policy import check_bundle, expression_problems
from tests.monai_bundles import inference_config


def write_config(folder: Path, config: dict[str, object]) -> Path:
    folder.joinpath("configs").mkdir(parents=True, exist_ok=True)
    folder.joinpath("configs", "inference.json").write_text(json.dumps(config))
    return folder


def test_a_model_zoo_style_bundle_is_within_the_allow_list(tmp_path: Path) -> None:
    check_bundle(write_config(tmp_path, inference_config()), ["configs/inference.json"], "toy@1")


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('pathlib').Path('ran').write_text('ran')",
        "import os",
        "from subprocess import run",
        "torch.load('/etc/shadow')",
        "numpy.fromfile('/etc/passwd')",
        "[c for c in ().__class__.__base__.__subclasses__()]",
        "open('/etc/passwd').read()",
        "getattr(torch, 'lo' + 'ad')",
        "monai.__builtins__['exec']('x=1')",
        "(lambda: 1).__globals__",
        "eval('1')",
    ],
)
def test_expressions_that_import_or_reach_outside_are_refused(expression: str) -> None:
    assert expression_problems(expression) != []


@pytest.mark.parametrize(
    "expression",
    [
        "torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "[{'image': i} for i in @datalist]",
        "@network_def.to(@device)",
        "monai.utils.set_determinism(seed=0)",
        "import glob",
        "numpy.uint8",
    ],
)
def test_the_expressions_model_zoo_bundles_use_are_allowed(expression: str) -> None:
    assert expression_problems(expression) == []


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("_target_", "subprocess.Popen", "outside monai, torch, numpy"),
        ("_target_", "os.system", "outside monai, torch, numpy"),
        ("_target_", "torch.hub.load", "denied attribute"),
        ("_target_", "monai.__builtins__", "denied attribute"),
        ("_mode_", "debug", "debug mode"),
    ],
)
def test_targets_outside_the_frameworks_and_debug_mode_are_refused(
    tmp_path: Path, key: str, value: str, why: str
) -> None:
    config = inference_config()
    config["probe"] = {"_target_": "Compose", key: value} if key == "_mode_" else {"_target_": value}
    with pytest.raises(CodeNotAllowed, match=why):
        check_bundle(write_config(tmp_path, config), ["configs/inference.json"], "toy@1")


def test_a_macro_that_reads_another_file_is_refused(tmp_path: Path) -> None:
    config = inference_config()
    config["network_def"] = "%configs/other.json#network_def"
    with pytest.raises(CodeNotAllowed, match="reads another file"):
        check_bundle(write_config(tmp_path, config), ["configs/inference.json"], "toy@1")

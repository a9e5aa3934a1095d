"""Every command the docs mark runnable (a fenced block opened with ```sh runnable) runs as
written, from the repository root, and succeeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"^```sh runnable\n(.*?)^```$", re.M | re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for n, match in enumerate(RUNNABLE.finditer(doc.read_text()), 1):
            blocks.append((f"{doc.relative_to(REPO)}#{n}", match.group(1)))
    return blocks


def test_every_guide_has_runnable_commands() -> None:
    guides = {"install", "operations", "tps-integration", "models", "security", "troubleshooting"}
    covered = {where.split("/")[-1].split(".")[0] for where, _ in runnable_blocks()}
    assert guides <= covered, guides - covered


@pytest.mark.slow
@pytest.mark.parametrize(("where", "block"), runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_a_runnable_block_of_the_docs_succeeds(where: str, block: str) -> None:
    # the venv's ie-gateway, importing this checkout's package
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{where}:\n{block}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_relative_links_of_the_docs_name_files_that_exist() -> None:
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing

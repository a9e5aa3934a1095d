"""constraints.txt pins every library the package and its extras need, torch at the version
pyproject names, and CI and install.sh install with it."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.peers import REPO


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_every_dependency_and_extra_is_pinned_and_torch_is_the_projects() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pinned = pins()
    missing = sorted({r.name for r in wanted if canonicalize_name(r.name) not in pinned})
    assert not missing
    for requirement in wanted:  # the pins satisfy what pyproject asks for
        assert requirement.specifier.contains(pinned[canonicalize_name(requirement.name)], prereleases=True), (
            requirement
        )
    assert pinned["torch"] == "2.13.0"  # no +cpu label: a GPU VM takes the CUDA build of the same version


def test_ci_and_install_sh_install_with_the_constraints() -> None:
    assert re.search(r"pip install .*-c constraints\.txt", (REPO / ".ci" / "run").read_text())
    assert '-c "$SRC_DIR/constraints.txt"' in (REPO / "deploy" / "install.sh").read_text()

"""Model publishers' keys for the tests: the repository's demo key (trusted by the test nodes'
config, like config/gateway.yaml) and fresh keys nobody trusts."""

from __future__ import annotations

from pathlib import Path

from ie_gateway.infer.signing import TrustedKey, generate_key, sign_model

REPO = Path(__file__).resolve().parents[1]
DEMO_KEY = REPO / "keys" / "demo-only-publisher"
DEMO_PUB = REPO / "keys" / "demo-only-publisher.pub"
DEMO_TRUSTED = (TrustedKey("demo", DEMO_PUB),)


def sign(package: Path, key: Path = DEMO_KEY) -> Path:
    """Sign ``package`` as its model.yaml describes it; return the package folder."""
    sign_model(package, key)
    return package


def new_key(folder: Path, name: str = "publisher") -> tuple[Path, Path]:
    """A fresh key pair in ``folder``: (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    generate_key(private, public)
    return private, public


def describe_signed(folder: Path, name: str, version: str, key: Path = DEMO_KEY) -> Path:
    """An nnU-Net folder or MONAI bundle described (model.yaml written) and signed, as the
    training side publishes it; return the folder."""
    from ie_gateway.infer.formats import describe_package

    describe_package(folder, name, version)
    return sign(folder, key)

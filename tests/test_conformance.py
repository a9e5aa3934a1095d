"""The conformance statement says what the node negotiates, and dcmtk gets exactly that."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from pydicom.uid import UID

from ie_gateway.conformance import accepted_contexts, proposed_contexts
from ie_gateway.config import load_config
from tests.peers import DCMTK_ENV, Node

SOP_CLASSES = [
    UID(u)
    for u in (
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage: not stated, so refused
        "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage: not stated, so refused
    )
]
SYNTAXES = [
    UID(u)
    for u in (
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline: lossy, never stated
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.5",  # RLE Lossless
    )
]


def storescu_negotiation(
    port: int, pairs: list[tuple[UID, UID]], file: Path, workdir: Path
) -> dict[tuple[UID, UID], str]:
    """Propose each (SOP class, transfer syntax) as its own context with dcmtk storescu (an
    association profile file) and read each context's result from its debug output."""
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}" for n, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", "[Statement]", "PresentationContexts = Contexts"]
    profile = workdir / "storescu.cfg"
    profile.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [
            "/usr/bin/storescu",
            "-d",
            "-xf",
            str(profile),
            "Statement",
            "-aet",
            "STORESCU",
            "-aec",
            "IE_GATEWAY",
            "127.0.0.1",
            str(port),
            str(file),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )
    answer = result.stdout + result.stderr
    ac = answer[answer.index("BEGIN A-ASSOCIATE-AC") : answer.index("END A-ASSOCIATE-AC")]
    results = {int(n): why for n, why in re.findall(r"Context ID:\s+(\d+) \(([^)]*)\)", ac)}
    return {pair: results[2 * i + 1] for i, pair in enumerate(pairs)} | {("max-pdu", ""): _max_pdu(ac)}  # type: ignore[dict-item]


def _max_pdu(ac: str) -> str:
    return re.search(r"Their Max PDU Receive Size:\s+(\d+)", ac).group(1)  # type: ignore[union-attr]


@pytest.mark.peer
def test_storescu_gets_accepted_exactly_the_contexts_the_statement_lists(
    node: Node, small_series: list[Path], tmp_path: Path
) -> None:
    stated = {(c.sop_class, ts) for c in accepted_contexts(load_config(node.config)) for ts in c.syntaxes}
    text = node.cli("conformance").stdout
    for sop, ts in stated:  # the printed statement is made from the same contexts
        row = next(line for line in text.splitlines() if line.startswith(f"| {sop.name} | SCP"))
        assert f"({ts})" in row
    pairs = list(product(SOP_CLASSES, SYNTAXES))
    got = storescu_negotiation(node.port, pairs, small_series[0], tmp_path)
    for pair in pairs:
        assert (got[pair] == "Accepted") == (pair in stated), (pair[0].name, pair[1].name, got[pair])
    assert got[(UID("1.2.840.10008.5.1.4.1.1.481.5"), SYNTAXES[0])] == "Abstract Syntax Not Supported"
    assert got[(SOP_CLASSES[0], UID("1.2.840.10008.1.2.4.50"))] == "Transfer Syntaxes Not Supported"
    pdu = got[("max-pdu", "")]  # type: ignore[index]
    assert ("Maximum PDU size received: unlimited" in text) == (pdu == "0")


@pytest.mark.peer
def test_echoscu_and_an_unknown_caller_are_answered_as_the_statement_says(node: Node) -> None:
    text = node.cli("conformance").stdout
    assert "| Verification SOP Class | SCP | Implicit VR Little Endian (1.2.840.10008.1.2)" in text
    ok = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "IE_GATEWAY", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "reason 3: calling AE title not recognised" in text
    refused = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "STRANGER", "-aec", "IE_GATEWAY", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_the_statement_proposes_what_the_destinations_accept_and_renders_as_html(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "models").mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "storage: {root: var}\nrouting_file: routing.yaml\nmodels_dir: models\n"
        "destinations: {TPS: {ae_title: ARIA, host: 10.1.2.9, port: 104, accepts: [rtstruct]}}\n"
    )
    proposed = {c.sop_class.name for c in proposed_contexts(load_config(config))}
    assert proposed == {"RT Structure Set Storage", "Verification SOP Class"}  # no SEG to a TPS that refuses it
    page = subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", "conformance", "--html", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert page.startswith("<!DOCTYPE html>") and "<td>ARIA</td>" in page and "<td>10.1.2.9:104</td>" in page

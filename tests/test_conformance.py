"""The conformance statement says what the node negotiates, and dcmtk gets exactly that."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from pydicom.uid import UID, JPEGBaseline8Bit, RLELossless
from pynetdicom import AE, build_role

from ie_gateway import reactor
from ie_gateway.config import load_config
from ie_gateway.interop import retrieve
from ie_gateway.interop.commitment import STORAGE_COMMITMENT
from ie_gateway.interop.conformance import BOTH_ROLES, accepted_contexts, proposed_contexts, statement
from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE
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


@pytest.mark.peer
def test_a_peer_proposing_storage_commitment_gets_what_the_statement_lists(node: Node) -> None:
    """A caller asking for commitment (node as SCP), and a destination reporting commitment on a
    new association (it takes the SCP role by role selection), are accepted with exactly the
    transfer syntaxes and roles the statement states."""
    stated = next(c for c in accepted_contexts(load_config(node.config)) if c.sop_class == STORAGE_COMMITMENT)
    assert stated.role == BOTH_ROLES
    assert f"| Storage Commitment Push Model SOP Class | {BOTH_ROLES} |" in node.cli("conformance").stdout
    offered = [*SYNTAXES, JPEGBaseline8Bit]
    for as_reporter in (False, True):
        ae = AE(ae_title="TPS" if as_reporter else "PACS")
        for ts in offered:  # one context per syntax, so each is answered on its own
            ae.add_requested_context(STORAGE_COMMITMENT, ts)
        roles = [build_role(STORAGE_COMMITMENT, scp_role=True, scu_role=False)] if as_reporter else []
        assoc = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY", ext_neg=roles)
        assert assoc.is_established
        try:
            accepted = {UID(str(cx.transfer_syntax[0])): cx for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
        assert set(accepted) == set(offered) & set(stated.syntaxes)
        assert all(cx.as_scp == as_reporter for cx in accepted.values())


def _config(tmp_path: Path, destinations: str, rest: str = "") -> Path:
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "models").mkdir(exist_ok=True)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"storage: {{root: var}}\nrouting_file: routing.yaml\nmodels_dir: models\ndestinations: {destinations}\n{rest}"
    )
    return config


def test_the_statement_lists_commitment_labelmap_fetch_and_dicomweb_when_configured(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "{TPS: {ae_title: ARIA, host: 10.1.2.9, port: 104, labelmap: true, commitment: true},"
        " CLOUD: {protocol: dicomweb, url: 'https://alice:s3cret@dicom.example.org/v1', auth: azure}}",
        "sources: {PACS: {ae_title: PACS, host: 10.1.2.3, port: 104}}\n"
        "http: {stow_callers: [{name: RIS, token: 'env:RIS_STOW_TOKEN'}]}\n"
        "node: {bind: 0.0.0.0, allowed_callers: [{ae_title: PACS}]}\n",
    )
    cfg = load_config(config)
    proposed = {c.sop_class: c.syntaxes for c in proposed_contexts(cfg)}
    assert proposed[UID(LABEL_MAP_SEGMENTATION_STORAGE)] == (RLELossless,)
    assert STORAGE_COMMITMENT in proposed
    assert retrieve.FIND_CONTEXT.abstract_syntax in proposed and retrieve.MOVE_CONTEXT.abstract_syntax in proposed
    text = statement(cfg, "test")
    assert "It does not query or retrieve" not in text
    assert "| Label Map Segmentation Storage | 1.2.840.10008.5.1.4.1.1.66.7 | yes | no |" in text
    assert "| Storage Commitment Push Model SOP Class | 1.2.840.10008.1.20.1 | yes | yes |" in text
    assert "| Study Root Query/Retrieve Information Model - MOVE | 1.2.840.10008.5.1.4.1.2.2.2 | yes | no |" in text
    assert "| PACS | PACS | 10.1.2.3:104 |" in text
    assert "| PACS | any address (unpinned) | no |" in text  # bound beyond loopback, no host pin
    assert "| A702 |" in text and "| C211 |" in text and "max_series_gb 8" in text
    dimse, web = text.split("## 6. Destinations (DICOM)")[1].split("## 8. DICOMweb")
    assert "| TPS | ARIA | 10.1.2.9:104 |" in dimse and "CLOUD" not in dimse
    assert "| CLOUD | STOW-RS (store) | dicom.example.org | azure |" in web
    assert "POST /dicomweb/studies" in web and "RIS" in web
    assert "alice" not in text and "s3cret" not in text and "RIS_STOW_TOKEN" not in text


def test_without_labelmap_commitment_or_sources_the_statement_claims_none_of_them(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "{TPS: {ae_title: ARIA, host: 10.1.2.9, port: 104}}"))
    proposed = {c.sop_class for c in proposed_contexts(cfg)}
    assert UID(LABEL_MAP_SEGMENTATION_STORAGE) not in proposed and STORAGE_COMMITMENT not in proposed
    assert retrieve.MOVE_CONTEXT.abstract_syntax not in proposed
    text = statement(cfg, "test")
    assert "No DICOM source is configured" in text and "STOW-RS receive endpoint" not in text
    assert "DICOMweb services used" not in text

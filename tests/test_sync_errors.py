"""Azure failures reach the admin as one line with the error code and what to do; the SDK's
per-request HTTP logging stays out of the node's log. Against Azurite."""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path

import pytest

from ie_gateway import log as logsetup
from ie_gateway.errors import SyncError
from ie_gateway.sync.blob import container_client, upload_case
from tests.azurite import azurite_blob  # noqa: F401  (fixture)

pytestmark = pytest.mark.peer


def test_a_missing_container_is_one_line_with_the_code_and_what_to_do(
        azurite_blob: str, tmp_path: Path) -> None:  # noqa: F811
    name = f"missing{uuid.uuid4().hex[:8]}"
    client = container_client(azurite_blob, None, name)
    (tmp_path / "a.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(SyncError) as caught:
        upload_case(client, "case1", {"ct": [tmp_path / "a.dcm"]}, {"model": {}})
    message = str(caught.value)
    assert "\n" not in message and "<?xml" not in message
    assert "ContainerNotFound" in message
    assert f"container {name} does not exist in the storage account: create it, or check sync.container" in message


def test_the_azure_sdk_logs_no_request_lines_at_info(azurite_blob: str) -> None:  # noqa: F811
    stream = io.StringIO()
    logsetup.configure("info", stream=stream)
    try:
        client = container_client(azurite_blob, None, f"t{uuid.uuid4().hex[:12]}")
        client.create_container()
        client.upload_blob("x", b"data")
        client.delete_container()
    finally:
        logsetup.configure("info")
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    assert not [e for e in lines if str(e.get("logger", "")).startswith("azure")]
    assert logging.getLogger("azure.core.pipeline.policies.http_logging_policy").getEffectiveLevel() >= logging.WARNING

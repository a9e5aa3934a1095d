"""The vocabulary: the words config, store, stages, page and CLI share, and how text becomes them."""

from __future__ import annotations

import pydantic
import pytest

from ie_gateway.config import Caller, Destination, InferenceSettings, SyncSettings, Webhook
from ie_gateway.store.records import ApprovedSet, JobDetail
from ie_gateway.vocab import (
    ActivationPolicy,
    ApprovalStatus,
    DateMode,
    Device,
    JobState,
    NotifyEvent,
    OutputKind,
    PeerAuth,
    PeerProtocol,
    Priority,
)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("APPROVED", ApprovalStatus.APPROVED),
        (" approved ", ApprovalStatus.APPROVED),
        ("REJECTED", ApprovalStatus.REJECTED),
        ("", ApprovalStatus.UNKNOWN),
        (None, ApprovalStatus.UNKNOWN),
        ("DRAFT", ApprovalStatus.UNKNOWN),  # not a defined term
    ],
)
def test_a_files_approval_status_becomes_one_of_the_defined_terms(text: str | None, status: ApprovalStatus) -> None:
    assert ApprovalStatus.of(text) is status


def test_a_destinations_accepts_are_output_kinds_and_an_unknown_kind_is_refused() -> None:
    assert Destination(ae_title="TPS", host="h", port=104, accepts=["seg"]).accepts == [OutputKind.SEG]
    with pytest.raises(pydantic.ValidationError, match="'rtstruct' or 'seg'"):
        Destination(ae_title="TPS", host="h", port=104, accepts=["rtdose"])


def test_an_approval_read_back_from_the_index_is_the_enum_not_its_text() -> None:
    detail = JobDetail(
        approved=(ApprovedSet(job=3, approval=ApprovalStatus.APPROVED, instances=1),), approval=ApprovalStatus.REJECTED
    )
    back = JobDetail.from_json(detail.to_json())
    assert back.approved[0].approval is ApprovalStatus.APPROVED and back.approval is ApprovalStatus.REJECTED
    assert back.approved_jobs() == [3]
    assert f"{JobState.NEEDS_REVIEW}" == "needs_review"  # what logs, status and the page print


def test_the_configs_closed_words_are_read_as_the_vocabulary_enums() -> None:
    web = Destination(protocol="dicomweb", url="https://pacs/dicom-web", auth="basic", username="u", password="env:P")
    assert web.protocol is PeerProtocol.DICOMWEB and web.auth is PeerAuth.BASIC
    assert InferenceSettings(device="cpu").device is Device.CPU
    sync = SyncSettings(date_shift="remove", activation={"organs": "auto"})
    assert sync.date_shift is DateMode.REMOVE and sync.activation == {"organs": ActivationPolicy.AUTO}
    assert Webhook(url="https://chat/hook", on=["drift"]).on == [NotifyEvent.DRIFT]
    assert Caller(ae_title="RESEARCH", priority="low").priority is Priority.LOW


def test_a_caller_cannot_be_high_priority_only_a_rule_can() -> None:
    with pytest.raises(pydantic.ValidationError, match="high is for a routing rule"):
        Caller(ae_title="CT1", priority="high")

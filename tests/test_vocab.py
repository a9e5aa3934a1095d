"""The vocabulary: the words config, store, stages, page and CLI share, and how text becomes them."""

from __future__ import annotations

import pydantic
import pytest

from ie_gateway.config import Destination
from ie_gateway.store.records import ApprovedSet, JobDetail
from ie_gateway.vocab import ApprovalStatus, JobState, OutputKind


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

"""The DICOM PS3.15 Annex E action table, as data, and the choices the profile leaves to us.

The table itself (Table E.1-1, every attribute the standard names, 2026c edition) comes from
the ``dicom-anonymizer`` package (KitwareMedical), which keeps it in step with the standard;
this module only maps its codes to our actions. Where the standard leaves a choice ("X/Z",
"Z/D", "X/Z/D": remove unless the IOD needs the attribute present or non-empty) we take the
choice that keeps any IOD valid without knowing it: present-but-empty for X/Z, a dummy value for
the rest. Sequences under "U*" are kept and their UIDs replaced, as for every nested dataset.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

TABLE_EDITION = "dicomfields_2026c"


class Action(enum.Enum):
    """What happens to one attribute (PS3.15 Table E.1-1 action codes, choices resolved)."""

    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    CLEAN = "U*"  # keep the sequence, replace the UIDs inside it


# Annex E category (as dicom-anonymizer names it) -> our action.
ACTION_OF_CATEGORY: Mapping[str, Action] = {
    "D_TAGS": Action.DUMMY,
    "Z_TAGS": Action.EMPTY,
    "X_TAGS": Action.REMOVE,
    "U_TAGS": Action.UID,
    "Z_D_TAGS": Action.DUMMY,
    "X_Z_TAGS": Action.EMPTY,
    "X_D_TAGS": Action.DUMMY,
    "X_Z_D_TAGS": Action.DUMMY,
    "X_Z_U_STAR_TAGS": Action.CLEAN,
}

# Dummy values for "D", by VR: valid for the VR and carrying nothing about the patient.
DUMMY_OF_VR: Mapping[str, object] = {
    "AE": "ANONYMISED",
    "AS": "000Y",
    "CS": "ANONYMISED",
    "DA": "19000101",
    "DT": "19000101000000",
    "DS": "0",
    "IS": "0",
    "LO": "ANONYMISED",
    "LT": "ANONYMISED",
    "PN": "ANONYMOUS",
    "SH": "ANONYMISED",
    "ST": "ANONYMISED",
    "TM": "000000",
    "UC": "ANONYMISED",
    "UR": "http://anonymised.invalid",
    "UT": "ANONYMISED",
    "FD": 0.0,
    "FL": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
}

# Dates that are removed even when the Modified Dates option shifts all other dates: a birth
# date stays identifying after a shift of a few years.
NEVER_SHIFTED: frozenset[int] = frozenset({0x00100030, 0x00100032})  # PatientBirthDate, -Time

# UIDs under this root are defined by the standard (SOP classes, transfer syntaxes, coding
# schemes) and identify nobody; every other UID is replaced.
DICOM_UID_ROOT = "1.2.840.10008."


@dataclass(frozen=True)
class MaskedRule:
    """An action for a repeating group, e.g. overlay data (60xx,3000)."""

    group: int
    element: int
    group_mask: int
    element_mask: int
    action: Action

    def matches(self, tag: int) -> bool:
        """True when ``tag`` (group << 16 | element) falls in this repeating group."""
        group, element = tag >> 16, tag & 0xFFFF
        return (group & self.group_mask == self.group & self.group_mask) and (
            element & self.element_mask == self.element & self.element_mask
        )


def _load() -> tuple[dict[int, Action], tuple[MaskedRule, ...]]:
    table = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, Action] = {}
    masked: list[MaskedRule] = []
    for category, action in ACTION_OF_CATEGORY.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[entry[0] << 16 | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append(MaskedRule(group, element, group_mask, element_mask, action))
    return exact, tuple(masked)


ACTIONS, MASKED_ACTIONS = _load()


def action_for(tag: int) -> Action | None:
    """The profile's action for ``tag``, or None when the table does not name it."""
    action = ACTIONS.get(tag)
    if action is not None:
        return action
    for rule in MASKED_ACTIONS:
        if rule.matches(tag):
            return rule.action
    return None

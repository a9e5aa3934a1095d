"""De-identify DICOM files for upload: PS3.15 Annex E Basic Application Level Confidentiality
Profile, with consistent keyed UIDs and (optionally) the Modified Dates option.

Every attribute the Annex E table names is removed, emptied, given a dummy or a new UID (see
``profile``), at every nesting level; private attributes are removed; every other UID that the
standard does not define is replaced, every other person name emptied. Replacement UIDs are
``2.25.<HMAC-SHA256(key, uid)>``: the same CT UID maps to the same new UID in the CT, the
AI RT-STRUCT/SEG and the clinician's approved RT-STRUCT, so references still resolve after
anonymisation, without any state shared between runs. Dates are shifted by a per-patient number
of days derived from the key, or removed. The re-identification map (pseudonym -> patient id,
study UID) is written to a SQLite file on the node and never leaves it.

Files are processed one at a time (read, transform, write a temp file, rename).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from ie_gateway.errors import AnonymiseError, BurnedInAnnotation, SyncError
from ie_gateway.sync.profile import (
    DICOM_UID_ROOT,
    DUMMY_OF_VR,
    NEVER_SHIFTED,
    Action,
    action_for,
)
from ie_gateway.vocab import DateMode

log = structlog.get_logger(__name__)

KEY_ENV = "IE_GATEWAY_ANON_KEY"
KEY_CREDENTIAL = "anon-key"  # file name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
MIN_KEY_BYTES = 16

DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile; keyed UIDs; ie-gateway"
_BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")

_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010


@dataclass(frozen=True)
class AnonymiseOptions:
    """Choices the profile leaves to the site.

    ``shift_days`` is the (earliest, latest) offset in days; each patient gets one offset in
    that range, derived from the key and the patient id. ``retain`` names attribute keywords
    kept as they are (e.g. ``ROIName`` when the site accepts model-given ROI names as clean
    descriptors); leave it empty for the plain basic profile.
    """

    dates: DateMode = DateMode.SHIFT
    shift_days: tuple[int, int] = (-3650, -365)
    retain: frozenset[str] = frozenset()
    pseudonym_prefix: str = "IE"

    def __post_init__(self) -> None:
        low, high = self.shift_days
        if low > high:
            raise SyncError(f"shift_days {self.shift_days}: earliest must not be after latest")


def load_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The anonymisation key: ``$IE_GATEWAY_ANON_KEY`` or ``$CREDENTIALS_DIRECTORY/anon-key``.

    Never read from YAML. Raises SyncError when neither is set or the key is shorter than
    16 bytes, saying where to put it.
    """
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENV)
    if value:
        key = value.encode()
    else:
        creds = env.get("CREDENTIALS_DIRECTORY")
        path = Path(creds) / KEY_CREDENTIAL if creds else None
        if path is None or not path.is_file():
            raise SyncError(
                f"no anonymisation key: set {KEY_ENV} or give the service a systemd credential "
                f"'{KEY_CREDENTIAL}' (LoadCredential={KEY_CREDENTIAL}:/etc/ie-gateway/credentials/{KEY_CREDENTIAL}; "
                "from a shell, as root: ie-gateway COMMAND --credentials-dir /etc/ie-gateway/credentials)"
            )
        key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise SyncError(f"anonymisation key is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


class Anonymiser:
    """Applies the profile with one key; reuse one instance for all files of a case."""

    def __init__(self, key: bytes, map_path: Path, options: AnonymiseOptions | None = None) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise SyncError(f"anonymisation key is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
        self._key = key
        self._map = PseudonymMap(map_path)
        self._options = options or AnonymiseOptions()
        self._retained = frozenset(_tag_of(kw) for kw in self._options.retain)

    def uid(self, uid: str) -> str:
        """The replacement of ``uid``: ``2.25.`` + 128 bits of HMAC-SHA256(key, uid)."""
        if uid.startswith(DICOM_UID_ROOT):
            return uid
        digest = self._mac(b"uid", uid)
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    def pseudonym(self, patient_id: str) -> str:
        """The pseudonymous PatientID (also PatientName's family name) for ``patient_id``."""
        return f"{self._options.pseudonym_prefix}{self._mac(b'patient', patient_id).hex()[:16].upper()}"

    def date_offset(self, patient_id: str) -> dt.timedelta:
        """The patient's date shift: a whole number of days within ``options.shift_days``."""
        low, high = self._options.shift_days
        value = int.from_bytes(self._mac(b"date-shift", patient_id)[:8], "big")
        return dt.timedelta(days=low + value % (high - low + 1))

    def anonymise_dataset(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place; raise BurnedInAnnotation when pixels carry identity."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise BurnedInAnnotation("series is flagged BurnedInAnnotation=YES; it is excluded from upload")
        patient_id = str(ds.get("PatientID", ""))
        study_uid = str(ds.get("StudyInstanceUID", ""))
        offset = self.date_offset(patient_id) if self._options.dates is DateMode.SHIFT else None
        ds.remove_private_tags()
        self._clean(ds, offset)
        pseudonym = self.pseudonym(patient_id)
        ds.PatientID = pseudonym
        ds.PatientName = f"{pseudonym}^"  # family name only; a bare word is the retired form
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        ds.DeidentificationMethodCodeSequence = self._method_codes(offset is not None)
        self._map.record(pseudonym, patient_id, self.uid(study_uid), study_uid)

    def anonymise_file(self, src: Path, out_dir: Path) -> Path:
        """Write the de-identified ``src`` to ``out_dir/<new SOPInstanceUID>.dcm``; return it."""
        try:
            ds = pydicom.dcmread(src)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise AnonymiseError(f"cannot read {src.name}: {exc}") from exc
        transfer_syntax = ds.file_meta.TransferSyntaxUID
        self.anonymise_dataset(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        out_dir.mkdir(parents=True, exist_ok=True)
        dst = out_dir / f"{ds.SOPInstanceUID}.dcm"
        tmp = out_dir / f"{ds.SOPInstanceUID}.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, dst)
        return dst

    def anonymise_files(self, srcs: Iterable[Path], out_dir: Path) -> list[Path]:
        """De-identify each file of ``srcs`` into ``out_dir``, one file in memory at a time.

        All or nothing: when one file fails (e.g. BurnedInAnnotation on a later slice) the
        files already written by this call are removed before the error propagates.
        """
        written: list[Path] = []
        try:
            for src in srcs:
                written.append(self.anonymise_file(src, out_dir))
        except SyncError:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        log.info("anonymised", files=len(written))
        return written

    def _mac(self, purpose: bytes, value: str) -> bytes:
        return hmac.new(self._key, purpose + b"\0" + value.encode(), hashlib.sha256).digest()

    def _clean(self, ds: Dataset, offset: dt.timedelta | None) -> None:
        for elem in list(ds):
            if elem.tag in self._retained:
                continue
            if elem.tag.element == 0:  # group lengths would be wrong after cleaning
                del ds[elem.tag]
                continue
            if elem.VR == "SQ":
                self._clean_sequence(ds, elem, offset)
            else:
                self._clean_element(ds, elem, offset)

    def _clean_sequence(self, ds: Dataset, elem: DataElement, offset: dt.timedelta | None) -> None:
        action = action_for(elem.tag)
        if action is Action.REMOVE:
            del ds[elem.tag]
        elif action in (Action.EMPTY, Action.DUMMY):
            elem.value = Sequence()
        else:
            for item in elem.value:
                self._clean(item, offset)

    def _clean_element(self, ds: Dataset, elem: DataElement, offset: dt.timedelta | None) -> None:
        action = action_for(elem.tag)
        if offset is not None and elem.VR in ("DA", "DT") and elem.tag not in NEVER_SHIFTED:
            elem.value = _shift(elem, offset)
        elif offset is not None and elem.VR == "TM" and elem.tag not in NEVER_SHIFTED:
            return  # whole-day shifts keep times of day consistent
        elif action is Action.REMOVE:
            del ds[elem.tag]
        elif action is Action.EMPTY:
            elem.value = None
        elif action is Action.DUMMY and elem.VR != "UI":
            elem.value = DUMMY_OF_VR.get(elem.VR)
        elif elem.VR == "UI":
            elem.value = self._new_uids(elem.value)
        elif elem.VR == "PN" or (elem.VR in ("DA", "DT") and action is None):
            elem.value = None  # names and dates the table does not list identify too

    def _new_uids(self, value: str | Iterable[object]) -> str | list[str]:
        if isinstance(value, str):
            return self.uid(value) if value else value
        return [self.uid(str(v)) for v in value]

    @staticmethod
    def _method_codes(shifted: bool) -> Sequence:
        codes = [_BASIC_PROFILE, _MODIFIED_DATES] if shifted else [_BASIC_PROFILE]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        return Sequence(items)


def _tag_of(keyword: str) -> int:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        raise SyncError(f"retain: {keyword!r} is not a DICOM attribute keyword")
    return tag


def _shift(elem: DataElement, offset: dt.timedelta) -> object:
    """Shift a DA/DT value (or each of several) by whole days; unparseable values are emptied."""
    values = elem.value if elem.VM > 1 else [elem.value]
    shifted = [_shift_one(str(v), offset) for v in values if v not in (None, "")]
    if not shifted or None in shifted:
        return None
    return shifted if len(shifted) > 1 else shifted[0]


def _shift_one(value: str, offset: dt.timedelta) -> str | None:
    try:
        day = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None
    return (day + offset).strftime("%Y%m%d") + value[8:]


class PseudonymMap:
    """The re-identification map on the node (SQLite, mode 0600); it is never uploaded."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: set[str] = set()

    def record(self, pseudonym: str, patient_id: str, pseudo_study_uid: str, study_uid: str) -> None:
        """Remember which patient and study a pseudonymous study stands for (idempotent)."""
        if pseudo_study_uid in self._seen:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if not self._path.exists():
            self._path.touch(mode=0o600)
        try:
            with sqlite3.connect(self._path) as con:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS pseudonyms (pseudo_study_uid TEXT PRIMARY KEY,"
                    " study_uid TEXT NOT NULL, pseudo_patient_id TEXT NOT NULL,"
                    " patient_id TEXT NOT NULL, recorded_at TEXT NOT NULL)"
                )
                con.execute(
                    "INSERT OR IGNORE INTO pseudonyms VALUES (?, ?, ?, ?, ?)",
                    (
                        pseudo_study_uid,
                        study_uid,
                        pseudonym,
                        patient_id,
                        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    ),
                )
            con.close()
        except sqlite3.Error as exc:
            raise SyncError(f"cannot write the pseudonym map {self._path}: {exc}") from exc
        self._seen.add(pseudo_study_uid)

    def lookup(self, pseudonym: str) -> list[tuple[str, str]]:
        """(patient_id, study_uid) pairs behind a pseudonymous PatientID, for re-identification."""
        with sqlite3.connect(self._path) as con:
            rows = con.execute(
                "SELECT patient_id, study_uid FROM pseudonyms WHERE pseudo_patient_id = ?",
                (pseudonym,),
            ).fetchall()
        con.close()
        return [(str(p), str(s)) for p, s in rows]

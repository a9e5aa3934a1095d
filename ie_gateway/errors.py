"""The exception tree of ie_gateway.

GatewayError
├── ConfigError            a config or rules file does not validate (carries file:line: key: why)
│   └── TLSConfigError     a TLS certificate, key or CA cannot be read or does not fit
├── StoreError             the spool or its index could not take or give data
│   ├── UnsafeUIDError     a UID that cannot name a file (path characters, > 64 chars)
│   ├── TransitionError    a job asked to move to a state its state does not lead to
│   └── BatchCommitError   a group commit of received instances failed: none of its batch is acked
├── InstanceOverLimit      an instance a peer sends passes a configured limit (`limits:`)
├── VolumeRefused          a series cannot be made into a trustworthy 3D image (reason for admins)
├── ModelError             a model package is missing, altered, or fails to load
│   ├── ManifestInvalid    model.yaml is missing or does not validate (file:line: key: why)
│   ├── BadModelRef        text that is not name or name@version (also a ValueError)
│   ├── ChecksumMismatch   a fold file's sha256 is not the manifest's
│   ├── VersionImmutable   different bytes offered under an existing version
│   ├── PackageUnsigned    a package has no signature (model.sig)
│   ├── UntrustedPublisher a package is signed by a key the node does not trust
│   ├── SignatureInvalid   a signature does not verify, or a file changed after signing
│   ├── PackageMismatch    a package's name or version is not the one the admin gave on import
│   ├── KeyExists          a publisher key file is there already (a key is never overwritten)
│   └── CodeNotAllowed     a MONAI config runs code beyond the allow-list, for a key without allow_code
├── InferenceError         inference failed or ran past its time limit
│   ├── InferenceCrashed   the inference process died (killed, out of memory, a crash)
│   └── InferenceOutOfMemory  the GPU ran out of memory (retried, once on the CPU if allowed)
├── WriteError             an RT-STRUCT or SEG could not be built or failed our validation
├── DeliveryError          a C-STORE to a destination failed (peer status kept)
│   ├── StowRefused        a DICOMweb service refused an upload for good (4xx other than 408/409/429)
│   └── CommitmentError    a storage commitment request or report could not be made or read
├── AgreementError         an approved structure set cannot be compared with the AI's contours
│   └── AssessTimedOut     the comparison ran past its time bound (approvals.assess_timeout_s)
├── ApprovalRefused        a structure set is not taken as the clinicians' truth (caller, patient, study)
├── CommissionError        a commissioning run cannot start, or one case of it cannot be run
├── AuthError              an admin account cannot be made or read (name, password, accounts file)
├── SyncError              anonymisation, upload or model download failed
│   ├── AnonymiseError     a file could not be read or de-identified (names the file)
│   └── BurnedInAnnotation a series says it has identifying text in its pixels
├── AdminError             an admin's action does not apply to the job as it stands
├── NotifyError            a webhook did not take an event (unreachable, or not 2xx)
├── FetchError             a source could not be asked for a study, or refused to send it
├── HttpError              the health/metrics HTTP endpoint could not start
├── ListenerProcessError   an extra listener process (node.listener_processes) did not start listening
├── BackupError            a backup cannot be made, or restored onto this node
└── BadDate                text that is not a date, a time or an age such as 7d (also a ValueError)

Every exception class of the package is defined here. Each module raises the most specific
class; broad catches (``except Exception``) sit only at the top of a thread or process loop (the
worker's stage loop, a delivery thread, the inference child's job loop, the scheduler's jobs),
which park the job or record the attempt with the message as its reason, so messages are
written for the admin who reads `status`. A delivery's failures are outbox rows with the
peer's status, not exceptions.
"""


class GatewayError(Exception):
    """Base of every error ie_gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration or rules file does not validate; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class TLSConfigError(ConfigError):
    """A TLS certificate, key or CA file cannot be read, or the key is not the certificate's."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


class StoreError(GatewayError):
    """The spool or its index could not store or return data."""


class UnsafeUIDError(StoreError):
    """A UID is not digits and dots of at most 64 characters, so it must not name a file."""


class TransitionError(StoreError):
    """A job was asked to move to a state its current state does not lead to."""


class BatchCommitError(StoreError):
    """A batch of received instances could not be made durable or indexed together: each
    instance of the batch is refused (the senders retry) and none of its rows is kept."""


class InstanceOverLimit(GatewayError):
    """An instance (or its series with it) passes one of ``limits:``; the receiver refuses it."""

    def __init__(self, limit: str, value: int, allowed: int) -> None:
        self.limit = limit
        self.value = value
        self.allowed = allowed
        super().__init__(f"{value} is over limits.{limit} ({allowed})")


class VolumeRefused(GatewayError):
    """A series cannot be turned into a trustworthy volume; the message says why."""


class ModelError(GatewayError):
    """A model package is missing, malformed, or fails to load."""


class ManifestInvalid(ModelError):
    """``model.yaml`` is missing or does not validate; ``errors`` holds ``file:line: key: why``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class BadModelRef(ModelError, ValueError):
    """Text that is not ``name`` or ``name@version`` (a ValueError too, so that pydantic
    validators report it at the rule's line)."""


class ChecksumMismatch(ModelError):
    """A fold file's sha256 differs from its manifest."""


class VersionImmutable(ModelError):
    """Different bytes were offered under a model version that already exists."""


class PackageUnsigned(ModelError):
    """A model package carries no signature (``model.sig``)."""


class UntrustedPublisher(ModelError):
    """A model package is signed, but by a key that is not in ``trusted_keys``."""


class SignatureInvalid(ModelError):
    """A package's signature does not verify, or a file was changed, added or removed after signing."""


class PackageMismatch(ModelError):
    """A package's signed or declared name or version is not the one given with it on import."""


class KeyExists(ModelError):
    """A publisher key would overwrite a file: a key is never overwritten."""


class CodeNotAllowed(ModelError):
    """A MONAI bundle's config names code outside the allow-list and its key may not run code."""


class InferenceError(GatewayError):
    """Inference failed or exceeded its time limit."""


class InferenceCrashed(InferenceError):
    """The inference process died under a job; counted as a crash of the job's stage."""


class InferenceOutOfMemory(InferenceError):
    """CUDA ran out of memory: transient (another job's memory, fragmentation), not the job's fault."""


class WriteError(GatewayError):
    """An output object could not be written or failed validation."""


class DeliveryError(GatewayError):
    """A C-STORE to a destination did not succeed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class StowRefused(DeliveryError):
    """A DICOMweb service refused an upload in a way a retry will not change (dead-letter at once)."""


class CommitmentError(DeliveryError):
    """A storage commitment request could not be made, or a request or report cannot be read."""


class AgreementError(GatewayError):
    """An approved structure set cannot be compared with the contours the node delivered."""


class AssessTimedOut(AgreementError):
    """Comparing a structure set with the AI's contours ran past ``approvals.assess_timeout_s``."""


class ApprovalRefused(GatewayError):
    """A clinician's structure set is kept but not linked to the CT job: the reason says why."""


class CommissionError(GatewayError):
    """A commissioning run cannot start (no cases, a report folder of another model), or one
    of its cases cannot be run (no approved structure set, two CT series); the report says why."""


class AuthError(GatewayError):
    """An admin account cannot be created, changed or checked (bad name, short password, a
    damaged accounts file)."""


class SyncError(GatewayError):
    """Anonymisation, upload or a model download failed."""


class AnonymiseError(SyncError):
    """A file could not be read or de-identified; the message names the file."""


class BurnedInAnnotation(SyncError):
    """The image says it has identifying text in its pixels; the series must not be uploaded."""


class AdminError(GatewayError):
    """An admin's action (reroute, release, retry) does not apply to the job in its state."""


class NotifyError(GatewayError):
    """A webhook did not take an event: not reachable, or it answered other than 2xx."""


class FetchError(GatewayError):
    """A source (query/retrieve) could not be reached, or refused to send the study."""


class HttpError(GatewayError):
    """The HTTP endpoint (health, metrics, admin page) could not listen."""


class BackupError(GatewayError):
    """A backup cannot be written, or a backup folder cannot be restored here (version, files)."""


class BadDate(GatewayError, ValueError):
    """Text that is not a date (YYYY-MM-DD), a time (ISO 8601) or an age back from now (7d, 12h,
    30m): a ``--since``. A ValueError too, as a parser's caller expects."""


class ListenerProcessError(GatewayError):
    """An extra listener process (``node.listener_processes``) exited or did not listen in time."""

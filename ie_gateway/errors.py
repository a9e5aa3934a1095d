"""The exception tree of ie_gateway.

GatewayError
├── ConfigError            a config or rules file does not validate (carries file:line: key: why)
│   └── TLSConfigError     a TLS certificate, key or CA cannot be read or does not fit
├── StoreError             the spool or its index could not take or give data
│   └── UnsafeUIDError     a UID that cannot name a file (path characters, > 64 chars)
├── VolumeRefused          a series cannot be made into a trustworthy 3D image (reason for admins)
├── ModelError             a model package is missing, altered, or fails to load
│   ├── ChecksumMismatch   a fold file's sha256 is not the manifest's
│   └── VersionImmutable   different bytes offered under an existing version
├── InferenceError         inference failed or ran past its time limit
├── WriteError             an RT-STRUCT or SEG could not be built or failed our validation
├── DeliveryError          a C-STORE to a destination failed (peer status kept)
│   └── CommitmentError    a storage commitment request or report could not be made or read
├── AgreementError         an approved structure set cannot be compared with the AI's contours
├── SyncError              anonymisation, upload or model download failed
├── AdminError             an admin's action does not apply to the job as it stands
├── NotifyError            a webhook did not take an event (unreachable, or not 2xx)
├── FetchError             a source could not be asked for a study, or refused to send it
└── HttpError              the health/metrics HTTP endpoint could not start

Each module raises the most specific class; only the worker loop catches broadly, and parks the
job with the message as its reason, so messages are written for the admin who reads `status`.
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


class VolumeRefused(GatewayError):
    """A series cannot be turned into a trustworthy volume; the message says why."""


class ModelError(GatewayError):
    """A model package is missing, malformed, or fails to load."""


class ChecksumMismatch(ModelError):
    """A fold file's sha256 differs from its manifest."""


class VersionImmutable(ModelError):
    """Different bytes were offered under a model version that already exists."""


class InferenceError(GatewayError):
    """Inference failed or exceeded its time limit."""


class WriteError(GatewayError):
    """An output object could not be written or failed validation."""


class DeliveryError(GatewayError):
    """A C-STORE to a destination did not succeed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class CommitmentError(DeliveryError):
    """A storage commitment request could not be made, or a request or report cannot be read."""


class AgreementError(GatewayError):
    """An approved structure set cannot be compared with the contours the node delivered."""


class SyncError(GatewayError):
    """Anonymisation, upload or a model download failed."""


class AdminError(GatewayError):
    """An admin's action (reroute, release, retry) does not apply to the job in its state."""


class NotifyError(GatewayError):
    """A webhook did not take an event: not reachable, or it answered other than 2xx."""


class FetchError(GatewayError):
    """A source (query/retrieve) could not be reached, or refused to send the study."""


class HttpError(GatewayError):
    """The HTTP endpoint (health, metrics, admin page) could not listen."""

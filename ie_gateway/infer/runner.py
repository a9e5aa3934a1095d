"""Inference with a time limit, in a persistent child process that keeps models resident.

A torch call cannot be interrupted from another thread, so the ensemble runs in a child process
(multiprocessing "spawn": no forked CUDA or lock state). The parent sends one job at a time over
a pipe and waits up to ``timeout_s``; past that it kills the child, starts a fresh one, and
raises InferenceError. A crash of the child (out of memory, a segfault in a library) also becomes
an InferenceError with the reason, and the next job gets a fresh child. A fresh child reports
"ready" once its imports are done, so starting Python and torch never counts against a job; the
time limit does cover loading the model when the child does not hold it yet. The first child
starts with the first job or verification, not with the runner: a node that only receives, or
has nothing to contour yet, spends neither the seconds nor the memory of a torch process.

The child also verifies packages (:meth:`InferenceRunner.verify`, the registry's probe): it loads
the folds with the package's framework (native TorchScript, nnU-Net v2, a MONAI bundle; see
:func:`load_model`) and runs a small patch, under the same time limit, and keeps what it loaded
resident for the jobs that follow. A job for a model the child does not hold runs that probe
first, so nothing unverified ever contours a CT.

The child is confined before it loads anything (:mod:`ie_gateway.infer.sandbox`): its own empty
network namespace (or a seccomp socket filter), no secrets in its environment, ``RLIMIT_AS`` of
``memory_gb`` on the CPU; how is logged once per child as ``inference_child_sandbox``. Whatever a
model does in there, the worst outcome is a failed job with a reason and a fresh child.

The child never opens the job folders: each child has one exchange folder (under
``exchange_root``, wiped at every start, removed at close). For a job the node hard-links (or,
across file systems, copies) the caller's CT file (any format SimpleITK reads; ``.mha`` is
simplest) into its ``in/``; the child writes the label map into ``out/`` atomically (temp file,
fsync, rename), compressed; the node then moves it to ``labels_path`` (a rename, or a copy to a
temp file beside it and a rename), so a reader never sees half a file. With ``files``
(:class:`~ie_gateway.infer.sandbox.FileRules`, ``inference.confine_files``) the child can open
nothing else but the system's files and the models.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import SimpleITK as sitk
import structlog

from ie_gateway.errors import GatewayError, InferenceCrashed, InferenceError, InferenceOutOfMemory, ModelError
from ie_gateway.files import raise_if_disk_full
from ie_gateway.infer.registry import ModelVersion
from ie_gateway.infer.sandbox import SINGLE_THREADED_IMPORTS, FileRules, confine, scrubbed_environ
from ie_gateway.infer.types import (
    Close,
    InferenceFailure,
    InferenceRequest,
    InferenceResult,
    Ready,
    Reply,
    Request,
    Segmentation,
    Verified,
    VerifyRequest,
)
from ie_gateway.log import configure as configure_logging
from ie_gateway.vocab import Device, FailureKind, ModelFormat

if TYPE_CHECKING:  # torch is imported by the child only, not by the node that owns it
    from ie_gateway.config import GatewayConfig

log = structlog.get_logger(__name__)

_CLOSE_GRACE_S = 5.0
#: How much lower the child's CPU priority (Linux ``nice``) is than the node's. On a CPU node the
#: model takes every core it is given; what people wait for meanwhile, the previous job's
#: RT-STRUCT (the write lane) and the next series arriving (the listeners), should not queue
#: behind it. The worker's background lane (nice 10) still yields to the model.
CHILD_NICENESS = 5
_START_TIMEOUT_S = 120.0  # importing torch in a fresh child, on a loaded machine


class Segmenter(Protocol):
    """A loaded package, whatever its format: probe it, or contour a CT file with it."""

    def probe(self) -> None: ...

    def segment_file(self, ct_path: Path) -> Segmentation: ...


def load_model(model: ModelVersion, device: str | None) -> Segmenter:
    """Load ``model`` with its format's code; the frameworks are imported only when needed."""
    fmt = model.manifest.format
    if fmt is ModelFormat.NNUNETV2:
        from ie_gateway.infer.nnunet import NnUNetModel

        return NnUNetModel(model, device)
    if fmt is ModelFormat.MONAI_BUNDLE:
        from ie_gateway.infer.monai_bundle import MonaiBundle

        return MonaiBundle(model, device)
    from ie_gateway.infer.ensemble import Ensemble

    return Ensemble(model, device)


class InferenceRunner:
    """One child process that runs jobs and verifications in order; calls from several threads
    (the worker's jobs, the sync's imports) wait for each other.

    ``device``: "cuda", "cpu" or None (CUDA when available). ``max_resident``: how many model
    versions the child keeps loaded (least recently used is dropped). ``log_level``: the child
    configures ``ie_gateway.log`` at this level (None leaves logging unconfigured).
    ``memory_gb``: the child's address-space limit on the CPU (None: none). ``files``: what
    the child may open besides the system and its exchange folder (None: not confined).
    ``exchange_root``: where the exchange folder is made (None: the system's temp folder; on the
    results' file system a CT is hard-linked rather than copied).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        device: str | None = None,
        max_resident: int = 2,
        log_level: str | None = "info",
        memory_gb: float | None = None,
        files: FileRules | None = None,
        exchange_root: Path | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._options = (device, max_resident, log_level, memory_gb, files)
        self._exchange_root = exchange_root
        self._exchange: Path | None = None
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # the worker's jobs and the sync's imports share the child
        self._sandbox: list[str] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (for status and logs), None while none runs."""
        return None if self._process is None else int(self._process.pid)

    @property
    def sandbox(self) -> list[str] | None:
        """How the last child started was confined, in words (None before the first child)."""
        return self._sandbox

    def run(self, model: ModelVersion, ct_path: Path, labels_path: Path) -> InferenceResult:
        """Segment the CT at ``ct_path`` with ``model``; write the label map to ``labels_path``.

        Raises InferenceError (time limit, crash, failure inside the model) or ModelError.
        """
        with self._lock:
            self._ensure_child()
            assert self._exchange is not None
            ct_in = self._exchange / "in" / f"ct{''.join(ct_path.suffixes)}"
            labels_out = self._exchange / "out" / f"labels{''.join(labels_path.suffixes)}"
            try:
                _link_or_copy(ct_path, ct_in)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # a full disk: the worker waits it out
                raise InferenceError(f"the CT file cannot be handed to the inference child: {exc}") from exc
            try:
                reply = self._call(InferenceRequest(model, ct_in, labels_out), labels_out)
            finally:
                ct_in.unlink(missing_ok=True)
            if not isinstance(reply, InferenceResult):
                raise InferenceError(f"the inference child answered {type(reply).__name__} to a job")
            _deliver(labels_out, labels_path)
        return reply

    def verify(self, model: ModelVersion) -> None:
        """Load ``model`` in the child with its framework and run a small patch (the registry's
        probe); it stays resident. ModelError if it does not load or run, InferenceError past
        the time limit or on a crash (the child is then replaced)."""
        with self._lock:
            try:
                self._call(VerifyRequest(model), None)
            except InferenceError as exc:
                raise ModelError(f"{model.spec}: verification failed: {exc}") from exc

    def _ensure_child(self) -> None:
        if self._process is None:
            self._start()
        elif not self._process.is_alive():
            self._restart("child was not running")

    def _call(self, message: Request, labels_path: Path | None) -> Reply:
        self._ensure_child()
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise InferenceCrashed(self._crashed(labels_path)) from None
        ready = wait([self._conn, self._process.sentinel], timeout=self.timeout_s)
        if not ready:
            self._restart("time limit")
            _remove_partial(labels_path)
            raise InferenceError(f"inference exceeded {self.timeout_s:g} s")
        if self._conn not in ready:
            raise InferenceCrashed(self._crashed(labels_path))
        try:
            reply: Reply = self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise InferenceCrashed(self._crashed(labels_path)) from None
        if isinstance(reply, InferenceFailure):
            raise _FAILURES[reply.kind](reply.text)
        return reply

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not within a few seconds."""
        if self._exchange is not None:
            shutil.rmtree(self._exchange, ignore_errors=True)  # after the child is gone, below
        if self._process is None:
            return
        if self._process.is_alive() and self._conn is not None:
            try:
                self._conn.send(Close())
            except (BrokenPipeError, OSError):
                pass  # the child is already gone; join below reaps it
            self._process.join(_CLOSE_GRACE_S)
        self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _new_exchange(self) -> Path:
        """A fresh, private exchange folder for the next child (what the last one left is gone)."""
        if self._exchange is not None:
            shutil.rmtree(self._exchange, ignore_errors=True)
        if self._exchange_root is not None:
            self._exchange_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _remove_stale_exchanges(self._exchange_root)
        prefix = f"ie-gateway-infer-{socket.gethostname()}-{os.getpid()}-"
        self._exchange = Path(tempfile.mkdtemp(prefix=prefix, dir=self._exchange_root))
        for sub in ("in", "out"):
            (self._exchange / sub).mkdir()
        return self._exchange

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        exchange = self._new_exchange()
        self._process = self._context.Process(
            target=_serve, args=(child, exchange, *self._options), name="ie-gateway-infer", daemon=True
        )
        files = self._options[-1]
        # the child inherits the environment as it is at exec
        with scrubbed_environ(SINGLE_THREADED_IMPORTS if files is not None else None):
            self._process.start()
        child.close()
        self._conn = parent
        # wait until the child has imported torch, so a job's time limit counts only its own work
        sandbox = _ready(parent)
        if sandbox is None:
            self._stop()
            raise InferenceError(f"inference process did not start within {_START_TIMEOUT_S:g} s")
        log.info("inference_child_started", child_pid=self._process.pid)
        if sandbox != self._sandbox:  # once per node, and again if it ever changes
            self._sandbox = sandbox
            log.info("inference_child_sandbox", confinement="; ".join(sandbox))

    def _stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def _restart(self, why: str) -> None:
        log.warning("inference_child_restart", reason=why)
        if self._process is not None:
            self._stop()
        self._start()

    def _crashed(self, labels_path: Path | None) -> str:
        self._process.join(_CLOSE_GRACE_S)
        code = self._process.exitcode
        if code is not None and code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                reason += " (out of memory?)"
        else:
            reason = f"exit code {code}"
        self._restart("crash")
        _remove_partial(labels_path)
        return f"inference process died ({reason})"


def _disk_full(text: str) -> OSError:
    return OSError(errno.ENOSPC, text)


#: what the parent raises for each kind of failure the child reports (a full disk as the OSError
#: the worker waits out, as for its own writes)
_FAILURES: dict[FailureKind, Callable[[str], Exception]] = {
    FailureKind.MODEL: ModelError,
    FailureKind.INFERENCE: InferenceError,
    FailureKind.OOM: InferenceOutOfMemory,
    FailureKind.DISK_FULL: _disk_full,
}


def runner_for(cfg: GatewayConfig, *, cpu: bool = False) -> InferenceRunner:
    """The inference child of a node, or of a CLI command that verifies models; ``cpu``: on
    the CPU whatever ``inference.device`` says (a job that ran CUDA out of memory)."""
    device = Device.CPU if cpu else None if cfg.inference.device is Device.AUTO else cfg.inference.device
    return InferenceRunner(
        cfg.inference.timeout_s,
        device=device,
        log_level=cfg.log_level,
        memory_gb=cfg.inference.memory_gb,
        files=file_rules(cfg) if cfg.inference.confine_files else None,
        exchange_root=cfg.storage.root / "results" / ".inference-exchange",
    )


def file_rules(cfg: GatewayConfig) -> FileRules:
    """What a node's inference child may read (the models) and what it must never see: the
    configuration's folder, the credentials folder, the storage root (spool, index, results)."""
    hidden = [cfg.source.resolve().parent, cfg.storage.root]
    if credentials := os.environ.get("CREDENTIALS_DIRECTORY"):
        hidden.append(Path(credentials))
    return FileRules(read=(cfg.models_dir,), hidden=tuple(hidden))


def _remove_stale_exchanges(root: Path) -> None:
    """Remove exchange folders that a node on this host left when it was killed (its process is
    gone): they hold a CT and maybe a label map. Other hosts' folders (a shared root) are theirs."""
    host = socket.gethostname()
    for folder in root.glob(f"ie-gateway-infer-{glob.escape(host)}-*-*"):
        pid = folder.name[len(f"ie-gateway-infer-{host}-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _link_or_copy(src: Path, dest: Path) -> None:
    """Put the CT where the child may read it: a hard link, or a copy across file systems."""
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dest)


def _deliver(src: Path, dest: Path) -> None:
    """Move the child's label map to ``dest`` atomically (a copy and a rename across file systems)."""
    try:
        src.replace(dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = _temp_path(dest, os.getpid())
    try:
        shutil.copyfile(src, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


def _ready(conn: Connection) -> list[str] | None:
    """The child's confinement once it said "ready" in time (None: it did not, or died)."""
    try:
        if not conn.poll(_START_TIMEOUT_S):
            return None
        message = conn.recv()
    except (EOFError, ConnectionResetError):
        return None
    return list(message.sandbox) if isinstance(message, Ready) else None


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End the child once its parent is gone: a node killed with SIGKILL cannot send "close", and
    the child, busy with a job, would only see EOF after it; a restarted node runs that job again."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)  # the check interval of this watch loop
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _lower_priority(by: int) -> None:
    """Lower the CPU priority of every thread of this process by ``by``. Linux keeps a ``nice``
    per thread: a library's thread started at import has its own, and a thread started later
    takes its creator's."""
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + by, 19))


def _serve(
    conn: Connection,
    exchange: Path,
    device: str | None,
    max_resident: int,
    log_level: str | None,
    memory_gb: float | None,
    files: FileRules | None,
) -> None:
    """The child's loop: one job per message until "close" or the parent goes away."""
    # first, before any thread starts or any model is loaded: a user namespace (and Landlock,
    # which confines the calling thread and those it starts) need one thread
    cuda = device == Device.CUDA or (device is None and _gpu_present())
    os.environ["TMPDIR"] = str(exchange / "out")  # a framework's scratch files: in the exchange
    tempfile.tempdir = None
    sandbox = confine(memory_gb, cuda=cuda, files=files, exchange=exchange)
    _lower_priority(CHILD_NICENESS)
    # Ctrl-C at a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_level is not None:
        configure_logging(log_level)
    _exit_with_parent(os.getppid())
    conn.send(Ready(tuple(sandbox)))
    resident: OrderedDict[tuple[str, str, str], Segmenter] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if isinstance(message, Close):
            return
        reply: Reply
        try:
            if isinstance(message, VerifyRequest):
                _resident(resident, message.model, device, max_resident, fresh=True)
                reply = Verified()
            else:
                segmenter = _resident(resident, message.model, device, max_resident)
                reply = _segment(segmenter, message.ct_path, message.labels_path)
        except GatewayError as exc:
            reply = InferenceFailure(
                FailureKind.MODEL if isinstance(exc, ModelError) else FailureKind.INFERENCE, str(exc)
            )
        except Exception as exc:  # noqa: BLE001 - top of the child's job loop: the job fails with
            # its reason (unreadable CT, torch error, CUDA out of memory) and the child serves on.
            reply = error_reply(exc)
        conn.send(reply)


def error_reply(exc: Exception) -> InferenceFailure:
    """What the child tells the parent about an unexpected error: its kind ("oom" for CUDA out
    of memory and "disk_full", which the worker retries; "inference" otherwise) and its first line."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
    text = f"{type(exc).__name__}: {first_line}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InferenceFailure(FailureKind.DISK_FULL, text)
    oom = type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in first_line
    return InferenceFailure(FailureKind.OOM if oom else FailureKind.INFERENCE, text)


def _gpu_present() -> bool:
    """Whether CUDA may be used (device "auto"), without importing torch: its device nodes."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _resident(
    resident: OrderedDict[tuple[str, str, str], Segmenter],
    model: ModelVersion,
    device: str | None,
    max_resident: int,
    *,
    fresh: bool = False,
) -> Segmenter:
    """The loaded, probed model, loading it (and dropping the least recent) if needed;
    ``fresh`` loads it again even if resident (verification after the files changed)."""
    key = (model.name, model.version, str(model.path))
    if key in resident and not fresh:
        resident.move_to_end(key)
        return resident[key]
    resident.pop(key, None)
    while len(resident) >= max_resident:
        resident.popitem(last=False)
    segmenter = load_model(model, device)
    segmenter.probe()
    resident[key] = segmenter
    return segmenter


def _temp_path(labels_path: Path, pid: int | str) -> Path:
    """Where the child writes before the rename; SimpleITK picks the format by the suffix."""
    return labels_path.with_name(f".{labels_path.stem}.{pid}.tmp{labels_path.suffix}")


def _remove_partial(labels_path: Path | None) -> None:
    """Delete what a killed child left half-written beside ``labels_path``."""
    if labels_path is None:
        return
    for path in labels_path.parent.glob(_temp_path(labels_path, "*").name):
        path.unlink(missing_ok=True)


def _segment(segmenter: Segmenter, ct_path: Path, labels_path: Path) -> InferenceResult:
    segmentation = segmenter.segment_file(ct_path)
    tmp = _temp_path(labels_path, os.getpid())
    labels = segmentation.labels
    try:
        sitk.WriteImage(labels, str(tmp), useCompression=True)
    except RuntimeError as exc:  # compressed, it takes at most its raw size
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(labels_path.parent, labels.GetNumberOfPixels() * labels.GetSizeOfPixelComponent(), exc)
        raise
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(labels_path)
    return InferenceResult(segmentation.volumes_cc, segmentation.timings_s, segmentation.windows, segmentation.folds)

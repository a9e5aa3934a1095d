"""Confinement of the inference child: no network, no secrets, bounded memory.

A model package is code (a MONAI bundle from a publisher with ``allow_code``, a TorchScript
graph, whatever a framework does with its files), so the child that loads and runs it is
confined before it loads anything, and says how at start-up (``inference_child_sandbox`` in the
log):

- **network**: its own, empty network namespace (``unshare(CLONE_NEWNET)``: no interface, not
  even loopback; as a non-root service user, inside a new user namespace). Where the kernel
  refuses both, a seccomp filter makes ``socket()`` fail for every family but ``AF_UNIX`` (and
  ``io_uring_setup``, which could open sockets behind its back). The pipe to the node was open
  before and keeps working. If even seccomp is refused, the log says the network is NOT isolated.
- **environment**: variables that may hold secrets (Azure, PostgreSQL, the node's own
  ``IE_GATEWAY_*``, ``CREDENTIALS_DIRECTORY``, anything named like a secret) are removed before
  the child is started (:func:`scrubbed_environ`), so they are neither in its ``os.environ`` nor
  in ``/proc/<pid>/environ``.
- **memory**: ``RLIMIT_AS`` of ``inference.memory_gb`` on the CPU (an allocation past it fails
  with MemoryError, which fails the job); not on CUDA, whose driver reserves far more address
  space than it uses (bound a GPU node with systemd's ``MemoryMax=`` instead).

- **files** (``inference.confine_files``, with :class:`FileRules`): a Landlock ruleset (Linux
  5.13 or later) lets the child open only what Python, torch and CUDA need: read and execute on
  the interpreter, its site-packages and every ``sys.path`` folder, ``/usr``, ``/lib``,
  ``/lib64``, ``/etc``, ``/sys``, ``/proc`` but other processes' folders (the node's
  ``environ``); read, write and device ioctls in ``/dev`` (``/dev/null``, ``/dev/nvidia*``,
  ``/dev/shm``); read on ``models_dir``; and its own exchange folder, where the
  node puts the CT (``in/``, read only) and takes the label map from (``out/``). Folders in
  ``FileRules.hidden`` (the node's configuration and credentials folders, the storage root with
  the spool, other jobs' results and the pseudonym map) are never granted by a wider grant: a
  granted folder that holds one is granted entry by entry, without it. Where the kernel has no
  Landlock, the log says the files are NOT confined.

Signatures and the MONAI allow-list keep hostile code out; this only limits what gets through.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import resource
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ie_gateway

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SECRET_ENV = re.compile(
    r"^(AZURE_|MSI_|IDENTITY_|PG|IE_GATEWAY_|AWS_)|^CREDENTIALS_DIRECTORY$|SECRET|TOKEN|PASSWORD|PASSWD|_KEY$|^KEY$",
    re.IGNORECASE,
)
_environ_lock = threading.Lock()

# seccomp: (audit arch, socket syscall number, io_uring_setup number) per machine
_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_EACCES = 0x7FFF0000, 0x00050000 | 13

# Landlock: syscall numbers (the same on x86_64 and aarch64) and filesystem access rights
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION, _LANDLOCK_RULE_PATH_BENEATH = 1, 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_FS_ALL = (1 << 16) - 1  # every right up to ABI 5; masked by what the kernel's ABI knows
_O_PATH = 0o10000000


@dataclass(frozen=True)
class FileRules:
    """What the inference child may read beyond the system (``read``: the models) and what no
    wider grant may ever include (``hidden``: configuration, credentials, the storage root)."""

    read: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


#: for a file-confined child: OpenBLAS (numpy) would start its worker threads at import, before
#: the child confines itself, and Landlock confines only the calling thread and those it starts
#: later; torch's own threads start later and are confined
SINGLE_THREADED_IMPORTS = {"OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def scrubbed_environ(extra: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Remove secret-looking variables from ``os.environ`` (and set ``extra``) while a child is
    started (it inherits the environment at exec), then put them back; yields the names removed."""
    with _environ_lock:
        removed = {name: os.environ.pop(name) for name in list(os.environ) if SECRET_ENV.search(name)}
        before = {name: os.environ.get(name) for name in extra or {}}
        os.environ.update(extra or {})
        try:
            yield sorted(removed)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            os.environ.update(removed)


def confine(
    memory_gb: float | None, cuda: bool, files: FileRules | None = None, exchange: Path | None = None
) -> list[str]:
    """Confine the calling process (the child, before it loads a model); what was done, in words.
    ``files`` and ``exchange``: restrict what it may open (see :func:`confine_files`)."""
    done = [_isolate_network()]
    if memory_gb and not cuda:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        done.append(f"memory: RLIMIT_AS {memory_gb:g} GB")
    else:
        done.append("memory: no RLIMIT_AS (" + ("CUDA" if cuda else "inference.memory_gb not set") + ")")
    left = sorted(name for name in os.environ if SECRET_ENV.search(name))
    for name in left:
        del os.environ[name]
    done.append("environment: secrets scrubbed" + (f" (and {len(left)} found in the child)" if left else ""))
    if files is not None and exchange is not None:
        done.append(confine_files(files, exchange))
    else:
        done.append("files: not confined (inference.confine_files is off)")
    return done


def network_isolated() -> bool:
    """Whether this process cannot open an internet socket to reach another host or loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            probe.connect(("127.0.0.1", 9))
    except PermissionError:
        return True  # seccomp refuses the socket itself
    except OSError as exc:
        return exc.errno == 101  # ENETUNREACH: no interface at all (own network namespace)
    return False


def _isolate_network() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    for flags, how in (
        (CLONE_NEWNET, "own network namespace (no interfaces)"),
        (CLONE_NEWUSER | CLONE_NEWNET, "own user and network namespace (no interfaces)"),
    ):
        if libc.unshare(flags) == 0:
            return f"network: {how}"
    errno = ctypes.get_errno()
    try:
        install_socket_filter()
    except OSError as exc:
        return f"network: NOT isolated (unshare: {os.strerror(errno)}; seccomp: {exc})"
    return f"network: seccomp filter, AF_UNIX sockets only (unshare refused: {os.strerror(errno)})"


def install_socket_filter() -> None:
    """A seccomp filter: ``socket()`` of any family but AF_UNIX, ``io_uring_setup`` and the x32
    syscall numbers fail with EACCES; everything else is allowed. OSError if it cannot."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        raise OSError(f"no socket filter for {platform.machine()}")
    audit_arch, nr_socket, nr_io_uring = arch
    program = [
        (0x20, 0, 0, 4),  # A = seccomp_data.arch
        (0x15, 0, 6, audit_arch),  # another ABI: allow (jumps to ALLOW)
        (0x20, 0, 0, 0),  # A = seccomp_data.nr
        (0x35, 5, 0, 0x40000000),  # x32 numbers: EACCES
        (0x15, 4, 0, nr_io_uring),  # io_uring_setup: EACCES
        (0x15, 0, 2, nr_socket),  # not socket(): ALLOW
        (0x20, 0, 0, 16),  # A = args[0] (the address family, low 32 bits)
        (0x15, 0, 1, socket.AF_UNIX),  # AF_UNIX: ALLOW, else EACCES
        (0x06, 0, 0, _RET_ALLOW),
        (0x06, 0, 0, _RET_EACCES),
    ]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    filters = ctypes.create_string_buffer(code)

    class _Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Program(len(program), ctypes.cast(filters, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) refused")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) refused")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = int(libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def confine_files(files: FileRules, exchange: Path) -> str:
    """Let this process (and what it starts) open only the system's files, the models and its
    ``exchange`` folder (``in/`` read, ``out/`` read-write: the child's ``TMPDIR``)."""
    abi = landlock_abi()
    if abi == 0:
        return "files: NOT confined (Landlock unavailable)"
    handled = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.c_uint64(handled)
    ruleset = int(libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8), 0))
    if ruleset < 0:
        return f"files: NOT confined (Landlock refused: {os.strerror(ctypes.get_errno())})"
    threads = len(os.listdir("/proc/self/task"))  # Landlock confines this thread and its future ones
    try:
        hidden = {Path(os.path.realpath(path)) for path in files.hidden}
        for path, access in _grants(files, exchange):
            _grant(libc, ruleset, Path(os.path.realpath(path)), access & handled, hidden)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) refused")
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self refused")
    finally:
        os.close(ruleset)
    said = f"files: Landlock ABI {abi} (system, Python, models read-only; own exchange folder)"
    return said + (f" ({threads - 1} threads started before it are not confined)" if threads > 1 else "")


def _grants(files: FileRules, exchange: Path) -> Iterator[tuple[Path, int]]:
    """The folders (and what on them) the child may use; the wider ones first."""
    # the node's own package too: an editable install reaches it through an import hook, not sys.path
    own = os.path.dirname(os.path.abspath(ie_gateway.__file__))
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, own, *(entry for entry in sys.path if entry)}
    for folder in sorted(python):
        if os.path.realpath(folder) != "/":  # a script started from / puts / on sys.path
            yield Path(folder), _FS_READ
    for system in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys"):
        yield Path(system), _FS_READ
    for entry in os.scandir("/proc"):  # its own /proc/PID, never another process's (the node's environ)
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            yield Path(entry.path), _FS_READ
    yield Path("/dev"), _FS_READ | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    yield Path("/dev/shm"), _FS_ALL
    for models in files.read:
        yield models, _FS_READ
    yield exchange / "in", _FS_READ
    yield exchange / "out", _FS_ALL


def _grant(libc: ctypes.CDLL, ruleset: int, path: Path, access: int, hidden: Iterable[Path]) -> None:
    """Allow ``access`` beneath ``path``; where a hidden folder lies beneath it, grant its
    entries one by one instead, leaving the hidden one out. Missing paths are skipped."""
    hidden = set(hidden)
    if path in hidden:
        return
    if any(path in h.parents for h in hidden) and path.is_dir():
        for entry in os.scandir(path):
            real = Path(os.path.realpath(entry.path))
            if real != path and real not in path.parents:  # a link back up would loop
                _grant(libc, ruleset, real, access, hidden)
        return
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not there (or not ours to see): nothing to grant
    try:
        rule = _PathBeneath(access if path.is_dir() else access & _FS_FILE_ONLY, fd)
        if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule refused for {path}")
    finally:
        os.close(fd)

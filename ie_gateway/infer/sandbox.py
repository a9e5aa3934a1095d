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

Not enforced here: the child runs as the service user, so it can read what that user can (the
spool of other jobs, the pseudonym map, the models, a credentials file whose path it guesses).
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
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def scrubbed_environ() -> Iterator[list[str]]:
    """Remove secret-looking variables from ``os.environ`` while a child is started (it
    inherits the environment at exec), then put them back; yields the names removed."""
    with _environ_lock:
        removed = {name: os.environ.pop(name) for name in list(os.environ) if SECRET_ENV.search(name)}
        try:
            yield sorted(removed)
        finally:
            os.environ.update(removed)


def confine(memory_gb: float | None, cuda: bool) -> list[str]:
    """Confine the calling process (the child, before it loads a model); what was done, in words."""
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

"""Group commit: the index rows of instances that several receivers stored at once, written in
one transaction by one committer thread.

Each receiving thread makes its own instance durable first (fdatasync of the file, rename,
fsync of its folder: in parallel with the others, which the kernel serves with shared journal
commits), then submits its index row and waits: the committer takes every row submitted
meanwhile as a batch, writes them in one transaction and wakes each waiter with its own result.
A C-STORE is still answered Success only after its file, its folder entry and its row are
committed. What the batch saves is the index's write lock: four receivers each committing on
their own queue for SQLite's lock, whose busy handler sleeps in growing steps, and on
PostgreSQL each commit is a flush of the server's log. With one sender a batch holds one row.

A failure of the batch (an index write that fails) is raised in every waiter of that batch as a
BatchCommitError, each its own instance, chained to the cause; the transaction's rollback keeps
none of the batch's rows. Their files stay in the spool, where the sender's retry finds its
place again (or start-up indexes them, as after a crash between the file and its row).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import structlog

from ie_gateway.errors import BatchCommitError

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: at most this many items in one batch: bounds one transaction's size and the longest wait
MAX_BATCH = 64
#: the committer ends after this long without work (and closes its index connection); the next
#: submit starts another
IDLE_S = 5.0


class _Waiter(Generic[T, R]):
    """One submitted item and, once the committer is done with it, its result or error."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Runs ``commit`` on batches of the items that threads submit, in one committer thread.

    ``commit`` takes the batch in submission order and returns one result per item, in that
    order; if it raises, every item of the batch fails and the committer goes on to the next.
    ``on_idle`` runs in the committer thread when it ends after ``idle_s`` without work: it
    closes what that thread holds (its index connection), so an idle node or a test's store
    keeps no thread or connection open.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[T]], Sequence[R]],
        name: str,
        *,
        on_idle: Callable[[], None] = lambda: None,
        idle_s: float = IDLE_S,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._commit = commit
        self._name = name
        self._on_idle = on_idle
        self._idle_s = idle_s
        self._max_batch = max_batch
        self._queue: list[_Waiter[T, R]] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> R:
        """Hand ``item`` to the committer and wait until its batch is committed; its result.
        Raises BatchCommitError when the batch failed."""
        waiter: _Waiter[T, R] = _Waiter(item)
        with self._ready:
            self._queue.append(waiter)
            self._start_if_needed()
            self._ready.notify()
        waiter.done.wait()
        if waiter.error is not None:
            raise BatchCommitError(f"{self._name} failed: {waiter.error}") from waiter.error
        return waiter.result  # type: ignore[return-value]  # set together with done, when no error

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a batch."""
        with self._ready:
            return len(self._queue)

    def _start_if_needed(self) -> None:
        # started on first use (a Store that only reads never starts one), again after it ended
        # idle, and in a process forked from one that had it
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._queue, self._idle_s):
                    self._thread = None  # under the lock: the next submit starts another
                    break
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
            self._commit_batch(batch)
        self._on_idle()

    def _commit_batch(self, batch: list[_Waiter[T, R]]) -> None:
        try:
            results = self._commit([w.item for w in batch])
            if len(results) != len(batch):  # no waiter may be left without an answer
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - top of the committer loop: each waiter of the batch fails
            log.error("group commit failed", what=self._name, batch=len(batch), error=str(exc))
            for waiter in batch:
                waiter.error = exc
                waiter.done.set()
            return
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result
            waiter.done.set()

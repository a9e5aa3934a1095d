"""The reactor pause that holds (ie_gateway.reactor), step by step through the interleaving that
lost a peer's N-ACTION response: the reactor said "paused", passed its checkpoint, and the
sender, pausing it just then, read that stale "paused" and sent."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ie_gateway import reactor
from ie_gateway.reactor import ReactorCheckpoint
from tests.peers import FailingStoreSCP, free_port, wait_until


def _association() -> Any:
    """What the checkpoint reads of an association whose reactor runs in another thread."""
    return SimpleNamespace(_is_paused=False, _kill=False, is_alive=lambda: True)


def test_a_pause_as_the_reactor_passes_the_checkpoint_waits_until_it_stops() -> None:
    assoc = _association()
    checkpoint = ReactorCheckpoint(assoc)
    # the reactor's turn, as pynetdicom writes it: say paused, wait at the checkpoint (open)...
    assoc._is_paused = True
    assert checkpoint.wait()
    # ...and before it unsays it, a sender pauses it: "paused" is withdrawn, the sender waits
    checkpoint.clear()
    assert assoc._is_paused is False
    # the reactor ends its turn and stops at the checkpoint on the next one: now it is paused
    assoc._is_paused = False
    stopped = threading.Thread(target=lambda: (setattr(assoc, "_is_paused", True), checkpoint.wait()))
    stopped.start()
    wait_until(lambda: checkpoint._stopped, 60, what="the reactor to stop at the checkpoint")
    assert assoc._is_paused is True and stopped.is_alive()
    checkpoint.set()  # the sender has its response: the reactor goes on
    stopped.join(60)
    assert not stopped.is_alive()


def test_a_paused_withdrawn_while_the_reactor_is_stopped_is_said_again() -> None:
    """A sender's release() once spun forever in CI on a "paused" that was false while the
    reactor waited at the checkpoint: a reactor stopped there says it again."""
    assoc = _association()
    checkpoint = ReactorCheckpoint(assoc)
    checkpoint.clear()
    stopped = threading.Thread(target=checkpoint.wait)
    stopped.start()
    wait_until(lambda: checkpoint._stopped and assoc._is_paused, 60, what="the reactor to stop")
    assoc._is_paused = False  # withdrawn behind the checkpoint's back
    wait_until(lambda: assoc._is_paused, 60, what="the stopped reactor to say it is paused again")
    assert stopped.is_alive()
    checkpoint.set()
    stopped.join(60)
    assert not stopped.is_alive()


def test_a_stopped_reactor_waits_no_longer_than_its_timeout() -> None:
    checkpoint = ReactorCheckpoint(_association())
    checkpoint.clear()
    assert checkpoint.wait(timeout=0.2) is False
    assert not checkpoint._stopped


def test_a_pause_between_the_reactor_saying_paused_and_stopping_lets_the_sender_go_on() -> None:
    """The other interleaving: the reactor says "paused" on its way to the checkpoint, the sender's
    pause withdraws it, then the reactor stops: it must say "paused" again, or the sender waits
    for a reactor that waits for the sender (a delivery hung so in CI)."""
    assoc = _association()
    checkpoint = ReactorCheckpoint(assoc)
    assoc._is_paused = True  # the reactor, on its way
    checkpoint.clear()  # the sender
    assert assoc._is_paused is False
    stopped = threading.Thread(target=checkpoint.wait)  # the reactor arrives
    stopped.start()
    wait_until(lambda: assoc._is_paused, 60, what="the reactor to say it is paused")
    assert checkpoint._stopped and stopped.is_alive()
    checkpoint.set()
    stopped.join(60)
    assert not stopped.is_alive()


def test_a_second_pause_of_a_stopped_reactor_keeps_it_paused() -> None:
    assoc = _association()
    checkpoint = ReactorCheckpoint(assoc)
    checkpoint.clear()
    stopped = threading.Thread(target=lambda: (setattr(assoc, "_is_paused", True), checkpoint.wait()))
    stopped.start()
    wait_until(lambda: checkpoint._stopped, 60, what="the reactor to stop at the checkpoint")
    checkpoint.clear()
    assert assoc._is_paused is True  # it is stopped: a sender may go on at once
    checkpoint.set()
    stopped.join(60)
    assert not stopped.is_alive() and checkpoint.is_set()


@pytest.mark.parametrize("how", ["killed", "ended"])
def test_a_pause_of_a_reactor_that_is_gone_is_not_withdrawn(how: str) -> None:
    """pynetdicom's kill() leaves "paused" set for a reactor that will never come back to the
    checkpoint: the sender goes on (and fails on the closed association) instead of waiting."""
    assoc = _association()
    if how == "killed":
        assoc._kill = True
    else:
        assoc.is_alive = lambda: False
    assoc._is_paused = True
    ReactorCheckpoint(assoc).clear()
    assert assoc._is_paused is True


def test_the_reactor_thread_pausing_itself_stays_paused() -> None:
    """pynetdicom releases from the reactor's own thread on a network timeout (and a handler may
    send from it): that thread is not stopped at the checkpoint, and must not wait for itself."""
    seen: list[bool] = []

    class Reactor(threading.Thread):
        _is_paused = True
        _kill = False

        def run(self) -> None:
            checkpoint.clear()
            seen.append(self._is_paused)

    assoc = Reactor()
    checkpoint = ReactorCheckpoint(assoc)  # type: ignore[arg-type]
    assoc.start()
    assoc.join(60)
    assert seen == [True]


@pytest.mark.peer
def test_a_guarded_association_with_dcmtk_is_answered_and_released(tmp_path: Path) -> None:
    """A real association with the guard in place: each send and the release pause the reactor
    through it (dcmtk's storescp answers C-ECHO; that its writes would fail does not matter)."""
    scp = FailingStoreSCP(tmp_path, free_port(), ae_title="STORESCP").start()
    try:
        ae = AE(ae_title="IE_GATEWAY")
        ae.add_requested_context(Verification)
        assoc = reactor.associate(ae, "127.0.0.1", scp.port, ae_title="STORESCP")
        assert assoc.is_established
        assert isinstance(assoc._reactor_checkpoint, ReactorCheckpoint)
        try:
            statuses = [int(assoc.send_c_echo().Status) for _ in range(20)]
        finally:
            assoc.release()
        assert statuses == [0] * 20
        assert assoc.is_released
    finally:
        scp.stop()

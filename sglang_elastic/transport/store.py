"""Waiting for keys of a ``torch.distributed.Store`` (the rendezvous every endpoint uses), with
failure knowledge: a wait for a key that a dead rank was to write ends at once."""
from __future__ import annotations

import time
from typing import Iterable, Optional

from .liveness import Liveness

__all__ = ["store_wait", "backoff"]


def store_wait(store, key: str, deadline: float, *, liveness: Optional[Liveness] = None, ranks: Iterable[int] = (),
               what: str = "") -> bool:
    """Wait until ``key`` exists in ``store`` or ``deadline`` (monotonic) passes; True if it exists.

    ``ranks`` are the ranks expected to write ``key``: every poll checks them in ``liveness`` and
    raises :class:`~sglang_elastic.transport.PeerFailure` naming one known dead (``what`` names the
    wait in the message). Polls start at 2 ms and back off to 50 ms; a death becoming known wakes
    the wait at once.
    """
    ranks = tuple(int(r) for r in ranks)
    delay = 0.002
    while True:
        if store.check([key]):
            return True
        if liveness is not None and ranks:
            liveness.check(ranks, what=what or f"a wait for store key {key!r}")
        now = time.monotonic()
        if now >= deadline:
            return False
        delay = backoff(delay, deadline - now, liveness)


def backoff(delay: float, left: float, liveness: Optional[Liveness] = None) -> float:
    """One poll's sleep of a store wait: ``delay`` (at most the ``left`` seconds to its deadline),
    woken at once by a death becoming known in ``liveness``; returns the next delay (doubling up
    to 50 ms)."""
    pause = min(delay, left)
    if liveness is not None:
        liveness.wait(pause)
    else:
        time.sleep(pause)
    return min(2 * delay, 0.05)

"""Degrade, never die: backup copies that keep failing while every rank is alive (an overloaded host
past the copy timeout) leave those backups unassigned and counted; the updater goes on serving."""
from __future__ import annotations

import torch

from sglang_elastic.location.updater import ExpertLocationUpdater
from sglang_elastic.transport.base import PeerFailure

from _updater_harness import placements, weights_for


class FailingTransport:
    """Every execute fails naming rank 1, which the vote then finds alive (a transient failure)."""

    def __init__(self) -> None:
        self.executes = self.resets = 0

    def register(self, *a) -> None:
        pass

    def unregister(self, name) -> None:
        pass

    def set_peers(self, peers, rebuild=False) -> None:
        self.resets += 1

    def execute(self, copies, timeout_s) -> None:
        self.executes += 1
        raise PeerFailure(1, "test: a pair failed")


def _updater():
    _, p0, _ = placements(seed=1)
    t = FailingTransport()
    votes = []

    def vote(key, live, failed):  # every rank voted: nobody is dead, yet copies failed
        votes.append((key, list(failed)))
        return [], False

    u = ExpertLocationUpdater(0, t, {"w": weights_for(p0, 0)}, p0, vote=vote)
    return u, t, votes, p0


def test_backup_fill_that_keeps_failing_with_everyone_alive_degrades():
    u, t, votes, _ = _updater()
    assert int((u.backup_layout.holder >= 0).sum()) > 0
    assert u.fill_backup() == 0                               # no exception: serving goes on
    assert u.stats["backup_copies_failed"] == 1
    assert int((u.backup_layout.holder >= 0).sum()) == 0      # nothing half-written is trusted
    assert t.executes == len(votes) > 1 and t.resets == t.executes - 1   # retried on rebuilt peers


def test_rehoming_that_keeps_failing_with_everyone_alive_degrades():
    """A change of live set (rank 3 gone) re-homes its backups; the copies keep failing with every
    remaining rank alive: set_live completes (placement without rank 3, pending layers of the target
    recomputed), the moved backups are unassigned and counted."""
    import numpy as np

    u, t, votes, p0 = _updater()
    u.fill_backup()
    u.stats["backup_copies_failed"] = 0
    live = np.array([True, True, True, False])
    u.set_live(live)
    assert u.stats["backup_copies_failed"] == 1
    assert not bool((u.placement.phy2log.view(u.placement.num_layers, 4, -1)[:, 3] >= 0).any())
    assert not bool((u.backup_layout.holder == 3).any())

"""Forming torch groups over a view (``transport/groups.py``): formations stay in step when a member
gave up on one and comes back to the same view. Threads of one process stand for the members (the
protocol is the store's keys; gloo pairs connect over 127.0.0.1 all the same)."""
from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from sglang_elastic.transport import Liveness, PeerFailure, form_group

VIEW = ((0, 1), (1, 1), (2, 1))
CPU = torch.device("cpu")


def _client(store):
    """A store client of its own (a member is a process: a blocking wait of one must not hold another's socket)."""
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=60))


def _form_all(store, ranks, lv, timeout_s=30.0):
    """Form VIEW on one thread per rank (each with its own store client); returns {rank: group or exception}."""
    out = {}
    clients = {r: _client(store) for r in ranks}

    def one(r):
        try:
            out[r] = form_group(clients[r], "t/grp", VIEW, r, 1, CPU, timeout_s, "127.0.0.1", liveness=lv[r])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[r] = exc

    ts = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


def _allreduce_ok(groups):
    """Every member's gloo group sums the members' ranks."""
    bufs = {r: torch.tensor([float(r)]) for r in groups}
    works = [groups[r].gloo.allreduce([bufs[r]]) for r in groups]
    for w in works:
        w.wait(datetime.timedelta(seconds=30))
    return {r: float(b) for r, b in bufs.items()}


@pytest.mark.parametrize("abandon_first", [True, False])
def test_a_member_that_gave_up_on_a_formation_meets_its_peers_in_the_next(abandon_first):
    """Rank 0 holds rank 2 dead (a suspicion) and gives up forming the view at once, before or
    while ranks 1 and 2 wait in that formation; the suspicion is withdrawn and rank 0 forms the same
    view again: all three land in the same formation and their group works (before the fix, the
    abandoned arrival put rank 0 one formation ahead of its peers, and all waited out the deadline)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    lv = {r: Liveness() for r in range(3)}
    lv[0].mark_dead(2, "test: a suspicion")
    late = {}
    if abandon_first:
        with pytest.raises(PeerFailure, match="peer rank 2 is dead during forming the torch group") as ei:
            form_group(_client(store), "t/grp", VIEW, 0, 1, CPU, 30.0, "127.0.0.1", liveness=lv[0])
        assert ei.value.rank == 2
        lv[0].mark_alive(2)
        groups = _form_all(store, [0, 1, 2], lv)
    else:
        def peers():
            late.update(_form_all(store, [1, 2], lv))

        t = threading.Thread(target=peers)
        t.start()
        with pytest.raises(PeerFailure) as ei:
            form_group(_client(store), "t/grp", VIEW, 0, 1, CPU, 30.0, "127.0.0.1", liveness=lv[0])
        assert ei.value.rank == 2
        lv[0].mark_alive(2)
        groups = _form_all(store, [0], lv)
        t.join(120)
        groups.update(late)
    bad = {r: g for r, g in groups.items() if isinstance(g, BaseException)}
    assert not bad, bad
    assert _allreduce_ok(groups) == {0: 3.0, 1: 3.0, 2: 3.0}


def test_a_member_that_never_arrives_is_named_at_the_deadline():
    """Ranks 0 and 1 wait for rank 2, which never comes: each gets a PeerFailure naming rank 2 when
    its deadline passes, and the formation is recorded abandoned (a late rank 2 does not wait in it)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    lv = {r: Liveness() for r in range(3)}
    out = _form_all(store, [0, 1], lv, timeout_s=1.0)
    assert all(isinstance(e, PeerFailure) and e.rank == 2 and "did not join the torch group" in str(e)
               for e in out.values()), out
    with pytest.raises(PeerFailure) as ei:   # alone now: it waits in a fresh formation, not the abandoned one
        form_group(_client(store), "t/grp", VIEW, 2, 1, CPU, 0.5, "127.0.0.1", liveness=lv[2])
    assert ei.value.rank == 0

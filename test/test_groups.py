"""Forming torch groups over a view (``transport/groups.py``): formations stay in step when a member
gave up on one and comes back to the same view. Threads of one process stand for the members (the
protocol is the store's keys; gloo pairs connect over 127.0.0.1 all the same)."""
from __future__ import annotations

import datetime
import threading
import time

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


def _wait_arrived(store, rank, timeout_s=30.0):
    """Until ``rank`` has arrived in some formation of VIEW (its arrival key is in the store)."""
    import hashlib
    base = f"t/grp/{hashlib.sha1(repr(VIEW).encode()).hexdigest()[:16]}"
    end = time.monotonic() + timeout_s
    while not store.check([f"{base}/0/arrived/{rank}"]):
        assert time.monotonic() < end, f"rank {rank} never arrived"
        time.sleep(0.01)


def _allreduce_ok(groups):
    """Every member's gloo group sums the members' ranks."""
    bufs = {r: torch.tensor([float(r)]) for r in groups}
    works = [groups[r].gloo.allreduce([bufs[r]]) for r in groups]
    for w in works:
        w.wait(datetime.timedelta(seconds=30))
    return {r: float(b) for r, b in bufs.items()}


@pytest.mark.parametrize("abandon_first", [True, False])
def test_a_member_that_gave_up_on_a_formation_meets_its_peers_in_the_next(abandon_first):
    """Rank 0 holds rank 2 dead (a suspicion) and gives up forming the view at once, before rank 1
    arrives or while it waits in that formation; the suspicion is withdrawn and rank 0 forms the same
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
    else:   # rank 1 waits in the formation when rank 0 gives up; rank 2 comes after
        t = threading.Thread(target=lambda: late.update(_form_all(store, [1], lv)))
        t.start()
        _wait_arrived(store, 1)
        with pytest.raises(PeerFailure) as ei:
            form_group(_client(store), "t/grp", VIEW, 0, 1, CPU, 30.0, "127.0.0.1", liveness=lv[0])
        assert ei.value.rank == 2
        lv[0].mark_alive(2)
        groups = _form_all(store, [0, 2], lv)
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


@pytest.mark.parametrize("who_rebuilds", ["self", "peer"])
def test_a_wait_woken_by_a_rebuild_blames_nobody(who_rebuilds):
    """A torch dispatcher's pair wait still pending from an earlier step (its group already broken
    by a timeout on another pair, or aborted by this rank's own rebuild) fails when a group is torn
    down; a live peer is not recorded dead for it (it would be refused in the next formation)."""
    from sglang_elastic.dispatch.torch_a2a import TorchExchange

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    lv = {r: Liveness() for r in (0, 1)}
    ex = {}

    def make(r):
        ex[r] = TorchExchange(r, _client(store), device=CPU, liveness=lv[r], ns="t/disp")
        ex[r].set_peers([0, 1])

    ts = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    g = ex[0].group
    work = g.gloo.recv([torch.empty(4)], g.index[1], 99)   # rank 1 never sends it
    woke = {}
    helper = threading.Thread(target=lambda: woke.update(exc=ex[0]._wait(g, 1, work, time.monotonic() + 3600)))
    helper.start()
    time.sleep(0.2)
    if who_rebuilds == "peer":
        g.broken = True   # as a timeout on another pair of this group would have left it
    first = 0 if who_rebuilds == "self" else 1
    t1 = threading.Thread(target=ex[first].set_peers, args=([0, 1],), kwargs={"rebuild": True})
    t1.start()
    helper.join(3)   # a peer's teardown may not wake it; this rank's own rebuild does
    ex[1 - first].set_peers([0, 1], rebuild=True)
    t1.join(60)
    helper.join(30)
    assert isinstance(woke.get("exc"), BaseException), woke
    assert not lv[0].dead() and not lv[1].dead(), (lv[0].dead(), lv[1].dead())
    for e in ex.values():
        e._drop()


class _SlowAfterArrival:
    """A store client whose arrival write returns only once the formation is decided (the others
    saw every member arrive and decided ``formed`` before this member looked at the decision)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set(self, key, value):
        self.inner.set(key, value)
        if "/arrived/" in key:
            state = key.rsplit("arrived/", 1)[0] + "state"
            end = time.monotonic() + 30
            while not self.inner.check([state]) and time.monotonic() < end:
                time.sleep(0.01)


def test_a_member_that_finds_its_formation_formed_connects_with_it(monkeypatch):
    """Rank 0 writes its arrival, and ranks 1 and 2 decide the formation ``formed`` before rank 0
    reads the decision: rank 0 was counted, so it connects with them (it must not take the decision
    for one made before it arrived and wait alone in the next formation)."""
    from sglang_elastic.transport import groups

    own = groups._own_client
    monkeypatch.setattr(groups, "_own_client", lambda s, t: own(getattr(s, "inner", s), t))  # gloo's client: a real one
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    lv = {r: Liveness() for r in range(3)}
    out = {}

    def first():
        try:
            out[0] = form_group(_SlowAfterArrival(_client(store)), "t/grp", VIEW, 0, 1, CPU, 10.0, "127.0.0.1",
                                liveness=lv[0])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[0] = exc

    t = threading.Thread(target=first)
    t.start()
    _wait_arrived(store, 0)
    out.update(_form_all(store, [1, 2], lv, timeout_s=10.0))
    t.join(60)
    bad = {r: g for r, g in out.items() if isinstance(g, BaseException)}
    assert not bad, bad
    assert _allreduce_ok(out) == {0: 3.0, 1: 3.0, 2: 3.0}

"""ExpertLocationUpdater over real transports: 4 processes on 127.0.0.1, weights checked exactly.

Each expert's weights are a deterministic function of (layer, expert), so every rank can check that
every slot holds exactly the expert the placement names — after plain updates with chunk sizes 1, 2
and all, and after a rank is SIGKILLed in the middle of an update (orphans restored from backups).
"""
import datetime
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import numpy as np
import pytest
import torch

from sglang_elastic.eplb import Placement, orphans, rebalance
from sglang_elastic.eplb.synthetic import drift, synthetic_load

from _updater_harness import (D, E, L, R, S, agreed_failure_hook, expert_value, free_port, placements, stop_cluster,
                              weights_for, wrong_backups, wrong_slots)

TIMEOUT = 5.0


def worker(kind: str, rank: int, port: int, mport: int, chunk: int, seed: int, victim: int, mode: str,
           out, opts=None) -> None:
    """One rank: build transport + updater, move p0 -> p1, check weights; `victim` is SIGKILLed
    (mode "kill") or frozen with SIGSTOP (mode "stop") in the middle of the update. ``opts``:
    ``knowledge`` (one Liveness fed by membership, given to transport, updater and vote, whose own
    timeouts are an hour: only knowledge can end their waits), ``backup_rows``."""
    opts = opts or {}
    try:
        from sglang_elastic.location.updater import ExpertLocationUpdater, StoreVote
        from sglang_elastic.membership import MembershipClient
        from sglang_elastic.state import ElasticEPStateManager
        from sglang_elastic.transport import PeerFailure, make_transport

        # Membership through the orchestrator's store; the state manager follows it.
        from sglang_elastic.transport import Liveness

        lv = Liveness()
        state = ElasticEPStateManager.init(ep_size=R)
        member = MembershipClient("127.0.0.1", mport, rank, heartbeat_interval_s=0.5, liveness=lv)
        member.bind_state(state)
        member.join()
        member.wait_for_epoch(lambda v: len(v.live) == R, timeout=60)
        epoch0 = state.membership_epoch

        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=datetime.timedelta(seconds=30))
        epochs = []  # failure events this rank handled
        knowledge = opts.get("knowledge", False)
        timeout = 3600.0 if knowledge else TIMEOUT
        transport = make_transport(kind, rank, store, **({"liveness": lv} if knowledge else {}))
        transport.set_peers(list(range(R)))
        load, p0, p1 = placements(seed)
        if mode == "fill":  # the victim is a joiner: it serves nothing yet, so its death loses nothing
            p0 = rebalance(load, R, S, live_ranks=np.arange(R) != victim)
        w = weights_for(p0, rank)
        upd = ExpertLocationUpdater(rank, transport, {"w": w}, p0, layers_per_chunk=chunk,
                                    live_ranks=np.ones(R, dtype=bool),
                                    timeout_s=timeout, vote=StoreVote(store, rank, timeout + 5),
                                    canary=True, checksum=lambda l, e: float(expert_value(l, e).sum()),
                                    backup_rows=opts.get("backup_rows"),
                                    **({"liveness": lv} if knowledge else {}))
        fill_failed = None
        if mode == "fill" and rank == victim:  # dies as the backups are being filled
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            upd.fill_backup()
        except PeerFailure as exc:
            if mode != "fill":
                raise
            fill_failed = list(exc.ranks)
            view = member.wait_for_epoch(lambda v: victim not in v.live, timeout=60)
            live = np.array([r in view.live for r in range(R)])
            upd.set_live(live)  # re-homes and fills the backups the failed fill left unassigned
            p1 = rebalance(load, R, S, live_ranks=live, current=upd.placement)

        upd.begin(p1, agreed_failure_hook(member, load, p1, epochs))
        steps, restored = 0, 0
        while not upd.done:
            if rank == victim and steps == 1:
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
            restored += upd.step().restored
            steps += 1
        bad = wrong_slots(w, upd.placement, rank) + [("backup",) + b for b in wrong_backups(upd, rank)]
        out.put((rank, "ok", dict(bad=bad, epoch=state.membership_epoch - epoch0, dead_seen=epochs,
                                  live=state.live_ranks(), restored=restored, final=upd.placement.phy2log.tolist(),
                                  target=upd.target.phy2log.tolist(), stats=dict(upd.stats),
                                  dead_known=sorted(lv.dead()), fill_failed=fill_failed)))
        # Close only when every survivor has recorded its figures: a client closed without leave()
        # is a crash to membership, and would bump the epoch a slower survivor is about to read.
        store.set(f"recorded/{rank}", "1")
        try:
            store.wait([f"recorded/{r}" for r in state.live_ranks()], datetime.timedelta(seconds=30))
        except RuntimeError:  # a peer died after the update: nothing is left to protect
            pass
        transport.close()
        member.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc()))


def run_cluster(kind: str, chunk: int, seed: int, victim: int = -1, mode: str = "kill", opts=None,
                heartbeat_timeout_s: float = 4.0):
    ctx = mp.get_context("spawn")
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=30))
    from sglang_elastic.membership import MembershipServer

    membership = MembershipServer("127.0.0.1", 0, world_size=R, heartbeat_timeout_s=heartbeat_timeout_s)
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, r, port, membership.port, chunk, seed, victim, mode, out),
                         kwargs=dict(opts=opts)) for r in range(R)]
    for p in procs:
        p.start()
    try:
        results = {}
        want = R - (1 if victim >= 0 else 0)
        while len(results) < want:
            rank, status, payload = out.get(timeout=120)
            assert status == "ok", f"rank {rank} failed:\n{payload}"
            results[rank] = payload
        return results
    finally:
        if victim >= 0 and procs[victim].is_alive():  # a frozen victim never exits by itself
            procs[victim].kill()
        stop_cluster(procs, membership)
        del master


KINDS = ["torch", "nixl", "mooncake"]


def _available(kind: str) -> bool:
    mod = {"torch": "torch", "nixl": "nixl", "mooncake": "mooncake"}[kind]
    try:
        __import__(mod)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 2, L])
def test_update_moves_weights_exactly(kind, chunk):
    if not _available(kind):
        pytest.fail(f"transport library for {kind!r} is not installed; .ci/setup installs it")
    results = run_cluster(kind, chunk, seed=chunk)
    finals = {tuple(map(tuple, r["final"])) for r in results.values()}
    assert len(finals) == 1, "every rank committed the same placement"
    for rank, r in results.items():
        assert r["bad"] == [], f"rank {rank} holds wrong weights at {r['bad']}"
        assert r["final"] == r["target"]
        assert r["epoch"] == 0


FAILURES = [("torch", 2, "kill"), ("torch", 0, "kill"), ("torch", 1, "stop"),
            ("nixl", 2, "kill"), ("nixl", 1, "stop"), ("mooncake", 2, "kill"), ("mooncake", 0, "kill")]


@pytest.mark.parametrize("kind, victim, mode", FAILURES)
def test_peer_dies_mid_update_survivors_finish_from_backups(kind, victim, mode):
    """SIGKILL (or SIGSTOP) a rank — rank 0 included — in the middle of an update: survivors detect
    it within the timeout, agree, re-plan from survivors and backups, and end with exact weights."""
    if not _available(kind):
        pytest.fail(f"transport library for {kind!r} is not installed; .ci/setup installs it")
    _, p0, p1 = placements(seed=7)
    live = np.ones(R, dtype=bool)
    live[victim] = False
    # The scenario must exercise the backup store: the victim holds the only replica of something.
    assert orphans(p0, live).any() and orphans(p1, live).any()
    results = run_cluster(kind, chunk=1, seed=7, victim=victim, mode=mode)
    assert sorted(results) == [r for r in range(R) if r != victim]
    finals = {tuple(map(tuple, r["final"])) for r in results.values()}
    assert len(finals) == 1, "every survivor committed the same placement"
    for rank, r in results.items():
        assert r["bad"] == [], f"rank {rank} holds wrong weights at {r['bad']}"
        assert r["final"] == r["target"]
        assert r["dead_seen"] == [[victim]], "one failure event, naming the victim, on every survivor"
        assert r["epoch"] == 1, "the membership epoch advanced exactly once on every survivor"
        assert victim not in list(r["live"]), "the state manager agrees"
        final = np.array(r["final"]).reshape(L, R, S)
        assert (final[:, victim] == -1).all(), "no slot left on the dead rank"
    assert sum(r["restored"] for r in results.values()) > 0, "orphans came back from the backup store"


def test_bad_chunk_size_is_a_clear_error():
    from sglang_elastic.location.updater import ExpertLocationUpdater

    p = Placement.trivial(L, E, R, S)
    with pytest.raises(ValueError, match="layers_per_chunk must be an integer >= 1"):
        ExpertLocationUpdater(0, None, {"w": torch.zeros(L, S, D)}, p, layers_per_chunk=0)
    with pytest.raises(ValueError, match=r"expected \[4, 5, \.\.\.\]"):
        ExpertLocationUpdater(0, None, {"w": torch.zeros(L, S + 1, D)}, p)


# ----------------------------------------------------------------------------- rejoin cycles
CYCLES = 2


def rejoin_worker(kind, rank, port, mport, fresh, cycle, out) -> None:
    """A rank of the rejoin drill. Each cycle: everyone live fills backups and moves to a placement
    that uses every rank (a joiner receives its experts from peers); then rank 2 dies at the start
    of the next update, survivors finish it from backups, publish the placement, and a fresh process
    joins as rank 2 for the next cycle."""
    try:
        from sglang_elastic.location.updater import ExpertLocationUpdater, StoreVote
        from sglang_elastic.membership import MembershipClient
        from sglang_elastic.transport import make_transport

        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=datetime.timedelta(seconds=60))
        # Transport first: peers that see this rank in the membership must find its new incarnation.
        transport = make_transport(kind, rank, store)
        member = MembershipClient("127.0.0.1", mport, rank, heartbeat_interval_s=0.5)
        member.join()
        view = member.wait_for_epoch(lambda v: len(v.live) == R, timeout=90)
        load = synthetic_load("lognormal1", L, E, seed=11)
        if fresh:  # the joiner learns the placement in force from the store and owns no weights yet
            current = Placement(torch.tensor(eval(store.get(f"placement/{cycle}").decode())), R, E)
            w = torch.full((L, S, D), float("nan"), dtype=torch.float64)
        else:
            current = rebalance(load, R, S)
            w = weights_for(current, rank)
        while True:
            transport.set_peers(sorted(view.live))
            vote = StoreVote(store, rank, TIMEOUT + 5, prefix=f"rj/{view.epoch}")
            upd = ExpertLocationUpdater(rank, transport, {"w": w}, current, live_ranks=np.ones(R, dtype=bool),
                                        timeout_s=TIMEOUT, generation=view.epoch, vote=vote)
            upd.fill_backup()
            upd.update(rebalance(drift(load, 0.1, seed=cycle), R, S, current=current))
            bad = wrong_slots(w, upd.placement, rank)
            if bad:
                raise AssertionError(f"cycle {cycle}: wrong weights at {bad}")
            import threading

            out.put((rank, "cycle", (cycle, len(os.listdir("/proc/self/fd")), threading.active_count())))
            if cycle == CYCLES:
                break

            def on_failure(dead):
                for d in dead:
                    member.report_dead(d, "transport PeerFailure")
                v = member.wait_for_epoch(lambda v: not set(dead) & set(v.live), timeout=60)
                live = np.array([r in v.live for r in range(R)])
                return live, rebalance(load, R, S, live_ranks=live, current=upd.placement)

            upd.begin(rebalance(drift(load, 0.2, seed=cycle + 100), R, S, current=upd.placement), on_failure)
            if rank == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # dies as the update starts
            while not upd.done:
                upd.step()
            bad = wrong_slots(w, upd.placement, rank)
            if bad:
                raise AssertionError(f"cycle {cycle} failover: wrong weights at {bad}")
            current = upd.placement
            cycle += 1
            if rank == min(r for r in range(R) if r != 2):
                store.set(f"placement/{cycle}", repr(current.phy2log.tolist()))
            store.set(f"ready/{cycle}/{rank}", "1")
            view = member.wait_for_epoch(lambda v: 2 in v.live and len(v.live) == R, timeout=120)
        out.put((rank, "ok", None))
        transport.close()
        member.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc()))


@pytest.mark.parametrize("kind", ["torch", "nixl"])
def test_rank_dies_and_a_fresh_process_rejoins_with_its_experts(kind):
    """Kill rank 2, start a fresh process as rank 2: it joins through membership, receives its
    experts from peers in the next update, and every rank checks every slot; the survivors' thread
    and fd counts do not grow across cycles."""
    if not _available(kind):
        pytest.fail(f"transport library for {kind!r} is not installed; .ci/setup installs it")
    from sglang_elastic.membership import MembershipServer

    ctx = mp.get_context("spawn")
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=60))
    membership = MembershipServer("127.0.0.1", 0, world_size=R, heartbeat_timeout_s=3.0)
    out = ctx.Queue()
    procs = [ctx.Process(target=rejoin_worker, args=(kind, r, port, membership.port, False, 0, out))
             for r in range(R)]
    started = set()
    for p in procs:
        p.start()
    cycles = {}
    try:
        done = set()
        while done != set(range(R)):
            rank, status, payload = out.get(timeout=180)
            if status == "error":  # collect the other ranks' view of the same failure too
                others = []
                try:
                    while True:
                        others.append(out.get(timeout=5))
                except queue.Empty:
                    pass
                pytest.fail(f"rank {rank} failed:\n{payload}\nothers: {others}")
            if status == "cycle":
                cycle, fds, threads = payload
                cycles.setdefault(rank, []).append((fds, threads))
                if rank != 2 and cycle < CYCLES and cycle + 1 not in started:
                    # Once the survivors finished the failover and published the placement, a fresh
                    # process takes rank 2's id.
                    master.wait([f"ready/{cycle + 1}/{r}" for r in (0, 1, 3)], datetime.timedelta(seconds=120))
                    started.add(cycle + 1)
                    fresh = ctx.Process(target=rejoin_worker,
                                        args=(kind, 2, port, membership.port, True, cycle + 1, out))
                    fresh.start()
                    procs.append(fresh)
            else:
                done.add(rank)
        for r in (0, 1, 3):
            assert len(cycles[r]) == CYCLES + 1, (r, cycles)
            fds = [f for f, _ in cycles[r][1:]]
            threads = [t for _, t in cycles[r][1:]]
            assert max(fds) - min(fds) <= 2 and max(threads) - min(threads) <= 1, cycles[r]
    finally:
        stop_cluster(procs, membership, timeout=5)
        del master


@pytest.mark.parametrize("kind", ["torch"])
def test_death_mid_update_ends_by_knowledge_and_backups_degrade(kind):
    """Transfers, votes and the membership heartbeat all have an hour's timeout, so only knowledge
    (the killed process's connection closing, pushed to every survivor's Liveness) can end the
    survivors' waits before the test's limit. The backup rows are too few to re-home every backup
    after the loss: the survivors cover what they can, count the rest and finish the update."""
    victim = 2
    results = run_cluster(kind, chunk=1, seed=7, victim=victim, opts=dict(knowledge=True, backup_rows=13),
                          heartbeat_timeout_s=3600.0)
    assert sorted(results) == [r for r in range(R) if r != victim]
    finals = {tuple(map(tuple, r["final"])) for r in results.values()}
    assert len(finals) == 1, "every survivor committed the same placement"
    for rank, r in results.items():
        assert r["bad"] == [], f"rank {rank} holds wrong weights at {r['bad']}"
        assert r["final"] == r["target"]
        assert r["dead_seen"] == [[victim]] and r["dead_known"] == [victim], r
        assert r["stats"]["backups_uncovered"] > 0 and r["stats"]["backup_shortfalls"] > 0, r["stats"]
    assert sum(r["restored"] for r in results.values()) > 0, "orphans came back from the backup store"


def test_death_during_backup_fill_ends_by_knowledge_and_the_update_goes_on():
    """A joiner dies as every rank fills its backups, with hour-long timeouts: the fill ends on every survivor with PeerFailure naming it, the survivors adopt the
    new live set (the half-filled backups are assigned and filled again) and then move to a
    placement over the survivors with exact weights."""
    victim = 1
    results = run_cluster("torch", chunk=2, seed=5, victim=victim, mode="fill", opts=dict(knowledge=True),
                          heartbeat_timeout_s=3600.0)
    assert sorted(results) == [r for r in range(R) if r != victim]
    for rank, r in results.items():
        assert r["fill_failed"] == [victim], r["fill_failed"]
        assert r["bad"] == [], f"rank {rank} holds wrong weights at {r['bad']}"
        assert r["final"] == r["target"] and r["dead_seen"] == []
        final = np.array(r["final"]).reshape(L, R, S)
        assert (final[:, victim] == -1).all()


def _reload_case(background: bool, reload: bool):
    """One process: rank 0 live, rank 1 dead with the only replicas of experts S..E-1 and no backup
    store. The target puts every expert on rank 0: those experts have no live source."""
    from sglang_elastic.location.background import BackgroundUpdater
    from sglang_elastic.transport import make_transport

    Lr, Er, Sr = 2, 6, 6
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    phy = torch.tensor([[0, 1, 2, -1, -1, -1, 3, 4, 5, 0, 1, 2]] * Lr)
    current = Placement(phy, 2, Er)
    target = Placement(torch.tensor([[0, 1, 2, 5, 4, 3, -1, -1, -1, -1, -1, -1]] * Lr), 2, Er)
    value = lambda l, e: torch.arange(D, dtype=torch.float64) + 1000.0 * (l * Er + e)  # noqa: E731
    w = torch.full((Lr, Sr, D), float("nan"), dtype=torch.float64)
    for l in range(Lr):
        for s in range(3):
            w[l, s] = value(l, s)
    transport = make_transport("torch", 0, store)
    transport.set_peers([0])
    calls = []

    def from_checkpoint(l, e):
        calls.append((l, e))
        return {"w": value(l, e)}

    upd = BackgroundUpdater(0, transport, {"w": w}, current, [True, False], backup=False, store=store,
                            background=background, reload=from_checkpoint if reload else None)
    try:
        upd.begin(target)
        for _ in range(2000):  # step boundaries, a forward pass (here: a short sleep) between them
            if upd.done:
                break
            upd.step()
            time.sleep(0.005)
        assert upd.done
    finally:
        upd.close()
        transport.close()
    for l in range(Lr):
        for s in range(Sr):
            assert torch.equal(w[l, s], value(l, int(target.phy2log[l, s]))), (l, s)
    assert sorted(calls) == [(l, e) for l in range(Lr) for e in (3, 4, 5)]
    assert upd.stats["experts_reloaded"] == 3 * Lr
    assert torch.equal(upd.placement.phy2log, target.phy2log)


@pytest.mark.parametrize("background", [False, True])
def test_expert_without_replica_or_backup_is_reloaded_from_the_checkpoint(background):
    """Degrade, never die (issue 19): an expert that lost every replica and its backup is read from the
    checkpoint (``reload=``) by the rank receiving it, counted in stats['experts_reloaded']."""
    _reload_case(background, reload=True)


def test_without_reload_a_lost_expert_is_an_update_failure_naming_it():
    from sglang_elastic.location.updater import UpdateFailure

    with pytest.raises(UpdateFailure, match="lost every replica and its backup"):
        _reload_case(False, reload=False)


def test_a_suspicion_membership_does_not_confirm_is_withdrawn_after_a_bounded_wait():
    """The updater side's agreement on a reported death waits at most 2 x heartbeat_timeout + 1 s; a
    rank the view still lists live (it kept heartbeating) is then alive again: the Liveness forgets
    it, the report is forgotten, the collective is retried over the view's live set, and it is
    counted (suspicion_withdrawn)."""
    from types import SimpleNamespace

    from sglang_elastic.membership import MembershipTimeout
    from sglang_elastic.membership.view import MembershipView
    from sglang_elastic.rehearsal.rank_update import UpdaterSide
    from sglang_elastic.transport.liveness import Liveness

    waits = []

    class Member:
        def report_dead(self, rank, reason=""):
            pass

        def wait_for_epoch(self, pred, timeout):
            waits.append(timeout)
            raise MembershipTimeout("no epoch without rank 2")

        def current(self):
            return MembershipView(epoch=3, live=(0, 1, 2, 3), incarnations={0: 0, 1: 0, 2: 0, 3: 0})

    side = UpdaterSide()
    side.rank = 0
    side.cfg = SimpleNamespace(cluster=SimpleNamespace(heartbeat_timeout_s=0.25))
    side.member, side.liveness, side.reported_dead = Member(), Liveness(), set()
    side.liveness.mark_dead(2, "a transport gave up on it")
    counted = []
    side._count = lambda mode, n=1, kind="degraded": counted.append((mode, n, kind))
    marked = []
    side.state = SimpleNamespace(is_alive=lambda r: True, mark_failed=lambda ranks, reason="": marked.extend(ranks))
    live = side._agreed_live_without([2])
    assert live == [0, 1, 2, 3] and waits == [1.5]
    assert not side.liveness.is_dead(2) and 2 not in side.reported_dead and marked == []
    assert counted == [("suspicion_withdrawn", 1, "recoveries")]


class _AdoptingUpdater:
    """An updater whose ``set_live`` fails (PeerFailure naming rank 4) while rank 4 is in the mask and
    ``fails(generation)`` says so; records each call's live ranks and generation."""

    target = None
    backup_layout = None

    def __init__(self, R, fails):
        from sglang_elastic.rehearsal.rank_update import live_mask

        self.live, self.fails, self.calls = live_mask([0, 1, 3, 4], R), fails, []

    def set_live(self, mask, generation=None):
        from sglang_elastic.transport.base import PeerFailure

        self.calls.append((np.flatnonzero(mask).tolist(), generation))
        if mask[4] and self.fails(generation):
            raise PeerFailure(4, "rank 4 failed under the collective")
        self.live = np.asarray(mask, dtype=bool)


class _KeepsRank4Live:
    """A membership client whose view keeps rank 4 live however often it is reported dead."""

    def report_dead(self, rank, reason=""):
        pass

    def wait_for_epoch(self, pred, timeout):
        from sglang_elastic.membership.view import MembershipTimeout

        raise MembershipTimeout("rank 4 keeps heartbeating")

    def current(self):
        from sglang_elastic.membership.view import MembershipView

        return MembershipView(epoch=16, live=(0, 1, 3, 4), incarnations={0: 0, 1: 0, 3: 0, 4: 0})


def _updater_side(R, updater, member, counted):
    """rehearsal's UpdaterSide of rank 0 around a fake updater and membership client."""
    from types import SimpleNamespace

    from sglang_elastic.rehearsal.rank_update import UpdaterSide
    from sglang_elastic.transport.liveness import Liveness

    side = UpdaterSide()
    side.rank, side.R = 0, R
    side.cfg = SimpleNamespace(cluster=SimpleNamespace(heartbeat_timeout_s=0.0))
    side.member, side.liveness, side.reported_dead = member, Liveness(), set()
    side.updater, side.update_load, side._trusted_layout = updater, None, None
    side._count = lambda mode, n=1, kind="degraded": counted.append((mode, n, kind))
    side.state = SimpleNamespace(is_alive=lambda r: True, mark_failed=lambda ranks, reason="": None)
    return side


def test_a_collective_retried_after_a_death_runs_over_the_survivors():
    """Adopting a step plan's live set (a collective) while a rank of that set has died since the
    plan: the retry after the recovery runs over the agreed survivors, never over the plan's set again
    (CI soak: rank 4 died after the plan listed it; every retry named it again until 8 recoveries
    ran out and the rank crashed)."""
    from sglang_elastic.membership.view import MembershipView
    from sglang_elastic.rehearsal.rank_update import live_mask

    R = 5

    class Member:
        def report_dead(self, rank, reason=""):
            pass

        def wait_for_epoch(self, pred, timeout):
            view = MembershipView(epoch=16, live=(0, 1, 3), incarnations={0: 0, 1: 0, 3: 0})
            assert pred(view)
            return view

    counted = []
    side = _updater_side(R, _AdoptingUpdater(R, fails=lambda generation: True), Member(), counted)
    live = side._collective(lambda lv: side.updater.set_live(live_mask(lv, R), generation=15), [0, 1, 3, 4])
    assert live == [0, 1, 3]
    assert side.updater.calls == [([0, 1, 3, 4], 15), ([0, 1, 3], None), ([0, 1, 3], 15)]
    assert counted == [("collective_replans", 1, "recoveries")]


def test_a_collective_that_keeps_failing_on_a_live_peer_says_so():
    """A peer this rank cannot reach although membership sees it heartbeat (a 6-rank nixl soak: the
    rank's NIXL copy of the peer went bad): every retry blames it, membership withdraws the suspicion,
    and after MAX_RECOVERIES the rank stops with a message naming that peer and saying it stayed live,
    not "8 peers died"."""
    from sglang_elastic.rehearsal.rank_update import MAX_RECOVERIES, live_mask

    R = 5
    # The plan's adoption (with a generation) needs rank 4's weights; adopting a live set does not.
    updater = _AdoptingUpdater(R, fails=lambda generation: generation is not None)
    side = _updater_side(R, updater, _KeepsRank4Live(), [])
    with pytest.raises(RuntimeError) as info:
        side._collective(lambda lv: side.updater.set_live(live_mask(lv, R), generation=15), [0, 1, 3, 4])
    assert [c for c in updater.calls if c[1] is not None] == [([0, 1, 3, 4], 15)] * MAX_RECOVERIES
    msg = str(info.value)
    assert f"failed {MAX_RECOVERIES} times in a row blaming rank(s) [4]; membership kept [4] live" in msg, msg


def test_an_adoption_that_keeps_failing_is_retried_flat_and_bounded():
    """Adopting the survivors after a failure can fail again (a peer membership keeps live that this
    rank cannot reach). Each such failure used to start a nested recovery (collective -> recover ->
    collective ...: 7 levels deep in a 6-rank nixl soak, up to MAX_RECOVERIES attempts at each
    level); now the adoption is retried in one loop: MAX_RECOVERIES attempts in all, then an error
    naming the peer that stayed live."""
    import traceback as tb

    from sglang_elastic.rehearsal.rank_update import MAX_RECOVERIES, live_mask

    R = 5
    depth = []

    class Deep(_AdoptingUpdater):
        def set_live(self, mask, generation=None):
            depth.append(len(tb.extract_stack()))
            super().set_live(mask, generation)

    updater = Deep(R, fails=lambda generation: True)
    counted = []
    side = _updater_side(R, updater, _KeepsRank4Live(), counted)
    with pytest.raises(RuntimeError) as info:
        side._collective(lambda lv: side.updater.set_live(live_mask(lv, R), generation=15), [0, 1, 3, 4])
    assert len(updater.calls) == 1 + MAX_RECOVERIES, "the plan's adoption, then MAX_RECOVERIES of the survivors"
    assert max(depth) - min(depth) <= 3, f"nested recoveries: stack depths {depth}"
    assert counted.count(("collective_replans", 1, "recoveries")) == MAX_RECOVERIES
    assert "membership kept [4] live" in str(info.value), str(info.value)


def test_a_failure_of_a_rank_s_own_is_voted_and_every_rank_retries_together():
    """A copy list one rank refuses on its own (it read a peer's metadata before that peer
    registered this update's buffers: ValueError) must reach the others through the vote: they
    retry together on renewed connections instead of waiting out the vote's timeout for a post that
    never comes (CI soak stall: one rank's job skipped, its peers waited 10.5 s, then recoveries at
    different boundaries). The vote's own timeout is far beyond the test's limit."""
    import threading

    import torch.distributed as dist

    from sglang_elastic.location.updater import ExpertLocationUpdater
    from sglang_elastic.membership import StoreVote
    from sglang_elastic.transport.base import Copy

    class Fake:
        def __init__(self, rank, refuse):
            self.rank, self.refuse, self.calls, self.rebuilds = rank, refuse, 0, 0

        def register(self, *a):
            pass

        def set_peers(self, ranks, rebuild=False):
            self.rebuilds += bool(rebuild)

        def execute(self, copies, timeout_s):
            self.calls += 1
            if self.calls <= self.refuse:
                raise ValueError("copies[0]: destination row 1 out of range (rank 1 'staging/bg0/w' has 1 rows)")

    store = dist.HashStore()
    _, p0, _ = placements(seed=1)
    fakes = [Fake(0, refuse=0), Fake(1, refuse=1)]
    ups = [ExpertLocationUpdater(r, fakes[r], {"w": weights_for(p0, r)}, p0, live_ranks=[True] * 4, backup=False,
                                 vote=StoreVote(store, r, 600.0, prefix="own"))
           for r in (0, 1)]
    copies = [Copy(0, 1, "w", 0, "w", 1)]
    out = {}

    def run(r):
        try:
            ups[r]._execute(copies)
            out[r] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported below
            out[r] = repr(exc)

    # Ranks 2 and 3 take no part in the copies but vote (as every live rank does): posted "ok" here.
    for seq in (1, 2):
        for r in (2, 3):
            store.set(f"own/0/{seq}/{r}", "ok")
    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {0: "ok", 1: "ok"}, out
    assert [f.calls for f in fakes] == [2, 2], "both ranks ran the copies again, together"
    assert [f.rebuilds for f in fakes] == [1, 1], "on connections renewed by both"
    assert store.get("own/0/1/1").decode().startswith("1 over "), "the refusing rank's vote names itself"


def test_voters_over_different_live_sets_recover_together():
    """A rank that agreed with membership on a death its peers have not learnt yet (a joiner whose
    connect found rank 3 dead: it builds its updater over the survivors, the others over the plan's
    set) votes on the same collective as they do. Its vote must fail with theirs, naming rank 3, so
    that every rank recovers together; it used to see "not ok, nobody dead", retry alone and give
    up its backups while the others waited for it in their recovery (6-rank nixl soak, seed 202:
    a 120 s stall). The vote's own timeout is far beyond the test's limit."""
    import threading

    import torch.distributed as dist

    from sglang_elastic.location.updater import ExpertLocationUpdater
    from sglang_elastic.membership import StoreVote
    from sglang_elastic.transport import Liveness
    from sglang_elastic.transport.base import Copy, PeerFailure

    class Fake:
        def __init__(self, rank):
            self.rank, self.calls = rank, 0

        def register(self, *a):
            pass

        def set_peers(self, ranks, rebuild=False):
            pass

        def execute(self, copies, timeout_s):
            self.calls += 1

    store = dist.HashStore()
    _, p0, _ = placements(seed=1)
    views = {0: [True, True, True, False], 1: [True] * 4}   # rank 0 already agreed that 3 is gone
    liveness = {0: Liveness(), 1: Liveness()}
    liveness[0].mark_dead(3, "membership")
    fakes = {r: Fake(r) for r in views}
    ups = {r: ExpertLocationUpdater(r, fakes[r], {"w": weights_for(p0, r)}, p0, live_ranks=views[r], backup=False,
                                    vote=StoreVote(store, r, 600.0, prefix="views"), liveness=liveness[r])
           for r in views}
    copies = {0: [Copy(0, 1, "w", 0, "w", 1)], 1: [Copy(0, 1, "w", 0, "w", 1), Copy(3, 1, "w", 0, "w", 2)]}
    store.set("views/0/1/2", "ok over 0,1,2,3")   # rank 2 ran the plan's set too; rank 3 never votes
    out = {}

    def run(r):
        try:
            ups[r]._execute(copies[r])
            out[r] = "ok"
        except PeerFailure as exc:
            out[r] = exc.ranks
        except Exception as exc:  # noqa: BLE001 - reported below
            out[r] = repr(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in views]
    threads[0].start()
    time.sleep(0.2)   # rank 0 is waiting for rank 1's post, as the joiner was
    liveness[1].mark_dead(3, "killed")  # rank 1 learns the death when its copies from rank 3 fail
    threads[1].start()
    for t in threads:
        t.join(60)
    assert out == {0: [3], 1: [3]}, out
    assert fakes[0].calls == 1, "rank 0 did not retry alone"

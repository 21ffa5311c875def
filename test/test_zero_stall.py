"""BackgroundUpdater (zero-stall rebalancing) over real transports: 4 processes on 127.0.0.1.

Each rank runs lockstep steps (a store barrier stands for the forward pass's token exchange) and calls
``step()`` at every boundary while chunks move in the background. After EVERY boundary each rank
checks that every slot holds, bit for bit, the expert its committed placement names (so no token
could be routed to a slot whose new weights are not committed), and every rank reports its
placement per step: all ranks commit the same chunk at the same boundary. One rank is SIGKILLed while
a background chunk is moving: survivors re-plan from live sources and backups and finish exactly.
Staging is freed once the update is complete.
"""
import datetime
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

import numpy as np
from hypothesis import given, settings, strategies as st
import pytest
import torch

from _updater_harness import (D, L, R, S, agreed_failure_hook, free_port, placements, stop_cluster, weights_for,
                              wrong_backups, wrong_slots)

MAX_STEPS = 1000  # a bound on boundaries, not time: a loaded box needs many while a chunk moves


def barrier(store, lv, step: int, rank: int, live: list, value: str) -> dict:
    """The forward pass's exchange, emulated: every live rank posts, everyone reads every post; a
    rank known dead is left out (its death ends the wait, as in the dispatcher)."""
    store.set(f"pass/{step}/{rank}", value)
    deadline = time.monotonic() + 60
    got = {}
    while True:
        for r in live:
            if r not in got and store.check([f"pass/{step}/{r}"]):
                got[r] = store.get(f"pass/{step}/{r}").decode()
        if all(r in got or lv.is_dead(r) for r in live):
            return got
        assert time.monotonic() < deadline, f"barrier {step} timed out"
        lv.wait(0.002)


def worker(rank: int, port: int, mport: int, seed: int, victim: int, depth: int, out, keep: bool = False) -> None:
    try:
        from sglang_elastic.location.background import BackgroundUpdater
        from sglang_elastic.membership import MembershipClient, StoreVote
        from sglang_elastic.transport import Liveness, make_transport

        lv = Liveness()
        member = MembershipClient("127.0.0.1", mport, rank, heartbeat_interval_s=0.5, liveness=lv)
        member.join()
        member.wait_for_epoch(lambda v: len(v.live) == R, timeout=60)
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
        transport = make_transport("torch", rank, store, liveness=lv)
        transport.set_peers(list(range(R)))
        load, p0, p1 = placements(seed)
        w = weights_for(p0, rank)
        # Hour-long timeouts: only knowledge (the Liveness) can end a wait on the dead rank.
        upd = BackgroundUpdater(rank, transport, {"w": w}, p0, live_ranks=np.ones(R, dtype=bool), timeout_s=3600,
                                vote=StoreVote(store, rank, 3600), liveness=lv, depth=depth, store=store,
                                keep_slots=keep or victim >= 0)  # the kill case keeps experts in their slots
        upd.fill_backup()
        failures = []
        boundary_vacates = []  # vacate computed on the main thread (the step boundaries and begin)
        real_vacated = upd._vacated

        def counted(phy, layers):
            if threading.current_thread() is threading.main_thread():
                boundary_vacates.append(list(layers))
            return real_vacated(phy, layers)
        upd._vacated = counted

        upd.begin(p1, agreed_failure_hook(member, load, p1, failures))
        peak = upd.staging_bytes()
        live = list(range(R))
        history, bad, commits = [], [], 0
        for step in range(MAX_STEPS):
            if rank == victim and step == 1:  # a background chunk is moving now
                os.kill(os.getpid(), signal.SIGKILL)
            if upd.done:
                break
            # The forward pass of this step: serves on the committed placement (the thread moves bytes).
            barrier(store, lv, step, rank, live, "x")
            # Still the placement the pass served on, with this pass's background writes landed:
            # a write into a slot it routes to (an emptied slot un-emptied too early) shows here.
            bad += [(step, "pass") + b for b in wrong_slots(w, upd.placement, rank)]
            rep = upd.step()
            commits += rep is not None and not rep.failed_ranks
            bad += [(step,) + b for b in wrong_slots(w, upd.placement, rank)]
            history.append(upd.placement.phy2log.tolist())
            live = np.flatnonzero(upd.live).tolist()
        upd.close()  # after the thread's last job (the final re-homing): every backup row is filled
        bad += [("backup",) + b for b in wrong_backups(upd, rank)]
        out.put((rank, "ok", dict(bad=bad, history=history, final=upd.placement.phy2log.tolist(),
                                  target=upd.target.phy2log.tolist(), done=upd.done, peak=peak,
                                  staging_after=upd.staging_bytes(), failures=failures, commits=commits,
                                  boundary_vacates=boundary_vacates,
                                  expected_peak=depth * S * D * 8)))
        transport.close()
        member.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc()))


def run_cluster(seed: int, victim: int = -1, depth: int = 2, keep: bool = False) -> dict:
    from sglang_elastic.membership import MembershipServer

    ctx = mp.get_context("spawn")
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=30))
    membership = MembershipServer("127.0.0.1", 0, world_size=R, heartbeat_timeout_s=4.0)
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, membership.port, seed, victim, depth, q, keep)) for r in range(R)]
    for p in procs:
        p.start()
    try:
        results = {}
        while len(results) < R - (victim >= 0):
            rank, status, payload = q.get(timeout=120)
            assert status == "ok", f"rank {rank} failed:\n{payload}"
            results[rank] = payload
        return results
    finally:
        stop_cluster(procs, membership)
        del master


def _same_on_every_rank(results: dict) -> None:
    histories = [r["history"] for r in results.values()]
    n = min(len(h) for h in histories)
    for step in range(n):
        assert len({str(h[step]) for h in histories}) == 1, f"ranks disagree on the placement after step {step}"


@pytest.mark.parametrize("keep", [False, True])
def test_background_update_commits_together_and_weights_are_exact_at_every_step(keep):
    """``keep``: targets kept in place, and each chunk's overwritten slots emptied while it moves
    (written in place, no commit copy); every routed slot stays exact through every pass."""
    from sglang_elastic.location.commit_rule import keep_slots

    _, p0, p1 = placements(seed=3)
    results = run_cluster(seed=3, depth=2, keep=keep)
    _same_on_every_rank(results)
    if keep:
        p1 = keep_slots(p0, p1)
    changed = int((p0.phy2log != p1.phy2log).any(1).sum())
    for rank, r in results.items():
        assert r["bad"] == [], f"rank {rank}: a slot held weights other than its committed expert: {r['bad']}"
        assert r["done"] and r["final"] == r["target"] == p1.phy2log.tolist()
        assert r["commits"] == changed, "one commit per changed layer (1-layer chunks)"
        assert r["peak"] == r["expected_peak"], "staging is depth chunks"
        assert r["staging_after"] == 0, "staging is freed after the update"
        assert r["failures"] == []
        if keep:  # begin() empties the first chunks' slots; each commit installs a placement that
            # has the next chunks' emptied already, so no later boundary computes it again
            assert len(r["boundary_vacates"]) == 2, r["boundary_vacates"]


def test_kill_during_a_background_chunk_replans_from_survivors():
    """Single staging (depth 1) and targets kept in place (keep_slots) here; the test above: double
    staging, targets as given."""
    victim = 2
    results = run_cluster(seed=7, victim=victim, depth=1)
    assert sorted(results) == [r for r in range(R) if r != victim]
    _same_on_every_rank(results)
    for rank, r in results.items():
        assert r["bad"] == [], f"rank {rank}: a slot held weights other than its committed expert: {r['bad']}"
        assert r["done"], f"rank {rank}: the update did not end in {MAX_STEPS} steps ({len(r['history'])} run)"
        assert r["final"] == r["target"]
        assert r["failures"] == [[victim]], "one failure event naming the victim on every survivor"
        final = np.array(r["final"]).reshape(L, R, S)
        assert (final[:, victim] == -1).all(), "no slot left on the dead rank"
        assert r["staging_after"] == 0


def test_bad_depth_is_a_clear_error():
    from sglang_elastic.location.background import BackgroundUpdater

    class NoTransport:
        def register(self, *a):
            pass

    _, p0, _ = placements(seed=1)
    with pytest.raises(ValueError, match="depth must be 1 or 2, got 3"):
        BackgroundUpdater(0, NoTransport(), {"w": weights_for(p0, 0)}, p0, depth=3, backup=False)
    with pytest.raises(ValueError, match="background mode needs a store"):
        BackgroundUpdater(0, NoTransport(), {"w": weights_for(p0, 0)}, p0, backup=False)


def test_commit_rule_reads_only_marks_every_rank_can_see():
    from sglang_elastic.location.commit_rule import decide

    assert decide({0: "ready@3", 1: "ready@4"}, 5) == (True, [])
    assert decide({0: "ready@3", 1: "ready@5"}, 5) == (False, []), "a mark of this boundary counts from the next"
    assert decide({0: "ready@3", 1: None}, 9) == (False, []), "a rank still moving the chunk delays only its commit"
    assert decide({0: "ready@3", 1: "dead@4", 2: "dead@2"}, 5) == (True, [1, 2])


def test_a_failed_job_keeps_its_error_but_not_its_frames():
    """A chunk job's error is handed to the boundary with its message and line numbers, but without
    its frames' locals: they hold the job and the updater (a reference cycle), and the chunk's copies
    and staging, which would otherwise stay in memory until a full garbage collection."""
    import gc
    import traceback as tb_mod
    import weakref

    import torch.distributed as dist

    from sglang_elastic.location.background import BackgroundUpdater, _Job
    from sglang_elastic.transport.base import PeerFailure

    class NoTransport:
        def register(self, *a):
            pass

    class Rows:  # stands for a chunk's staging views, held by the failing frames
        pass

    _, p0, _ = placements(seed=1)
    u = BackgroundUpdater(0, NoTransport(), {"w": weights_for(p0, 0)}, p0, backup=False, store=dist.HashStore())
    rows = Rows()
    held = weakref.ref(rows)

    def transfer(job=None, rows=rows):  # a chunk job is a lambda over its job (and the copies' frames hold tensors)
        raise PeerFailure(2, "peer rank 2 failed")

    job = _Job(0, [0], 0, keys=[u._key(_Job(0, [0], 0), 0)])
    u._run_job(transfer, job)
    del rows, transfer
    assert isinstance(job.error, PeerFailure) and job.error is u._broken and job.done.is_set()
    text = "".join(tb_mod.format_exception(job.error))
    assert "peer rank 2 failed" in text and "in transfer" in text, text
    gc.disable()
    try:
        assert held() is None, "the failed frames' locals are still alive"
        ref = weakref.ref(u)
        u.close()
        del u, job
        assert ref() is None, "the updater is kept alive by its job's error"
    finally:
        gc.enable()


@pytest.mark.parametrize("background", [False, True])
def test_a_closed_updater_with_a_kept_slots_hook_is_freed_without_a_garbage_collection(background):
    """The rehearsal's updaters re-plan with ``keep_slots`` and a failure hook bound to their owner
    (which holds the updater): neither the hook's wrapper nor the owner's hooks may make a reference
    cycle, or every updater replaced on a join (backup rows, staging: ~36 MiB each in the soak) stays
    in memory until a rare full collection (the 10-minute soak's RSS growth)."""
    import gc
    import weakref

    import torch.distributed as dist

    from sglang_elastic.location.background import BackgroundUpdater

    class NoTransport:
        def register(self, *a):
            pass

        def unregister(self, name):
            pass

        def set_peers(self, *a, **k):
            pass

    class Owner:  # stands for the rank: it holds the updater and gives it bound-method hooks
        def on_failure(self, dead):
            return self.updater.live, self.updater.placement

        def prepare(self, placement):
            return placement

    _, p0, p1 = placements(seed=1)
    owner = Owner()
    owner.updater = BackgroundUpdater(0, NoTransport(), {"w": weights_for(p0, 0)}, p0, backup=False,
                                      store=dist.HashStore(), background=background, keep_slots=True,
                                      prepare=owner.prepare)
    u = owner.updater
    u.begin(p1, on_failure=owner.on_failure)
    assert u._on_failure is not None and u._on_failure is not owner.on_failure  # wrapped by keep_slots
    live, kept = u._on_failure([])  # the wrapper still works (it reads the updater it wraps)
    assert kept.phy2log.shape == p1.phy2log.shape
    ref = weakref.ref(u)
    gc.collect()
    gc.disable()
    try:
        u.close()
        del u, live, kept
        owner.updater = None  # the rank replaces it on a join
        assert ref() is None, "the replaced updater is kept alive by a reference cycle"
    finally:
        gc.enable()


def test_a_held_boundary_starts_no_background_work_until_it_ends():
    """While a step boundary is held, a job submitted to the transport thread is not even queued (the
    boundary pays none of its CPU); it runs once the (nested) hold ends, or at once when the boundary
    itself waits for the thread (a recovery draining must not deadlock)."""
    import threading

    import torch.distributed as dist

    from sglang_elastic.location.threads import SharedThreads

    ran = []

    class Owner:
        def _run_job(self, fn, job):
            fn()

    th, owner = SharedThreads(dist.HashStore()), Owner()
    try:
        with th.quiet():
            with th.quiet():
                th.submit(owner, lambda: ran.append("a"), None)
            assert not th.open.is_set() and th.jobs.unfinished_tasks == 0, "the inner release opened the threads"
        th.join()
        assert ran == ["a"], ran
        with th.quiet():
            th.submit(owner, lambda: ran.append(threading.current_thread().name), None)
            assert ran == ["a"], "a job ran during a held boundary"
            th.join()  # the boundary waits for the thread: the job runs now
            assert ran[-1].endswith("-updater"), ran
        assert th.open.is_set() and th._holds == 0
    finally:
        th.close()


def test_copies_into_empty_slots_write_the_weights_and_leave_the_commit():
    """A slot that holds no expert (e.g. a joining rank's) is written in place; its commit row goes."""
    from sglang_elastic.location.commit_rule import direct_to_empty
    from sglang_elastic.transport.base import Copy

    S, chunk = 2, [3]
    w = torch.zeros(4 * S, 5)
    stage = {"w": "staging/bg0/w"}
    buf = torch.zeros(S, 5)
    rows = ([w[3 * S + 0], w[3 * S + 1]], [buf[0], buf[1]])  # rank 1's commit rows: slots 0 and 1
    empty = torch.tensor([[False, False, True, False]])        # [1 layer, R=2 x S=2]: rank 1 slot 0 is empty
    copies = [Copy(0, 1, "w", 1, "staging/bg0/w", 0), Copy(0, 1, "w", 2, "staging/bg0/w", 1),
              Copy(1, 0, "w", 7, "staging/bg0/w", 0), Copy(0, 2, "backup/w", 0, "backup/w", 3)]
    out, kept = direct_to_empty(copies, rows, chunk, empty, 1, S, stage, {"w": buf})
    assert out[0] == Copy(0, 1, "w", 1, "w", 3 * S + 0), out[0]
    assert out[1:] == copies[1:], "only copies into an empty slot change"
    assert len(kept[0]) == 1 and kept[0][0].data_ptr() == w[3 * S + 1].data_ptr() and kept[1][0].data_ptr() == buf[1].data_ptr()
    out0, kept0 = direct_to_empty(copies, rows, chunk, empty, 0, S, stage, {"w": buf})
    assert out0 == out and len(kept0[0]) == 2, "every rank redirects the same copies; only the receiver drops its row"


def test_keep_slots_keeps_each_ranks_experts_in_their_slots():
    """A target reordered within each rank: the same experts per rank, those already held stay put."""
    from sglang_elastic.eplb.placement import Placement
    from sglang_elastic.location.commit_rule import keep_slots

    cur = Placement(torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, -1, -1, -1]]), 2, 6)
    tgt = Placement(torch.tensor([[1, 0, 5, 3, 2, 4], [0, 1, 2, 3, 4, 5]]), 2, 6)
    got = keep_slots(cur, tgt).phy2log
    assert got.tolist() == [[0, 1, 5, 3, 4, 2], [0, 1, 2, 3, 4, 5]], got
    for l in range(2):
        for r in range(2):
            assert sorted(got[l, 3 * r:3 * r + 3].tolist()) == sorted(tgt.phy2log[l, 3 * r:3 * r + 3].tolist())


def test_a_rank_given_up_on_decides_at_the_same_boundary_as_its_peers():
    """A rank whose chunk is still moving long after it began (its thread stuck or slow) finds the
    ``dead@b`` verdict a peer wrote in place of its mark: that verdict is its post, so at the next
    boundary it reads the same marks as its peers and decides with them (waiting for its own post
    instead, it answered the step while its peers recovered at that boundary, waiting for it)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from sglang_elastic.location.background import BackgroundUpdater, _Job
    from sglang_elastic.location.commit_rule import decide

    store = dist.HashStore()
    me = SimpleNamespace(rank=1, store=store, _key=lambda job, r: f"ready/0/0/{job.index}/{r}")
    job = _Job(0, [0], 0, live=[0, 1], started=time.monotonic() - 10)
    job.keys = [me._key(job, r) for r in job.live]
    BackgroundUpdater._take_verdict(me, job)
    assert not job.posted                         # nothing written yet: keep waiting for its own post
    store.set(job.keys[0], "ready@4")             # rank 0 posted, then gave up on rank 1 at boundary 7
    store.compare_set(job.keys[1], "", "dead@7")
    BackgroundUpdater._take_verdict(me, job)
    assert job.posted
    posts = {r: store.get(k).decode() for r, k in zip(job.live, job.keys)}
    assert decide(posts, 7) == (False, []) and decide(posts, 8) == (True, [1])   # the peer's rule, too


def test_vacate_empties_overwritten_slots_but_keeps_a_replica_of_every_expert():
    """Slots a chunk overwrites leave routing while it moves when their expert stays served
    elsewhere; an expert whose every replica is overwritten keeps its first one; drained slots
    (target -1) and slots that keep their expert stay."""
    from sglang_elastic.location.commit_rule import vacate

    cur = torch.tensor([[0, 1, 2, 3, 0, 1, 4, 5]])
    tgt = torch.tensor([[0, 6, 2, 7, 7, 6, -1, 3]])
    # slot 1 (expert 1 -> 6): expert 1 only elsewhere on slot 5, also overwritten: slot 1 stays (first).
    # slot 3 (3 -> 7): expert 3's only replica: stays. slot 4 (0 -> 7): 0 stays on slot 0: emptied.
    # slot 5 (1 -> 6): second overwritten replica of 1: emptied. slot 6 drained: stays. slot 7 (5 -> 3): only replica.
    assert vacate(cur, tgt).tolist() == [[False, False, False, False, True, True, False, False]]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_vacate_properties(data):
    """Any placement rows: only overwritten slots are emptied, every expert served before keeps a
    routed replica, and applying it again empties nothing more."""
    from sglang_elastic.location.commit_rule import vacate

    n = data.draw(st.integers(1, 3))
    P = data.draw(st.integers(1, 12))
    E = data.draw(st.integers(1, 8))
    row = st.lists(st.integers(-1, E - 1), min_size=P, max_size=P)
    cur = torch.tensor([data.draw(row) for _ in range(n)])
    tgt = torch.tensor([data.draw(row) for _ in range(n)])
    empty = vacate(cur, tgt)
    assert not (empty & ~((cur >= 0) & (tgt >= 0) & (cur != tgt))).any()
    after = cur.masked_fill(empty, -1)
    for l in range(n):
        assert set(after[l][after[l] >= 0].tolist()) == set(cur[l][cur[l] >= 0].tolist())
    assert not vacate(after, tgt).any(), "idempotent"


def test_copies_that_touch_a_row_in_common_run_in_order():
    """A chunk's copies and its backups' re-homing share one execute (one vote) unless a re-homed
    backup is written into a row the chunk restores an orphan from (a full store reuses rows), or
    reads a row the chunk writes: one execute runs its copies in no defined order, so those run
    as two, the chunk's first."""
    from sglang_elastic.location.commit_rule import in_order
    from sglang_elastic.transport.base import Copy

    restore = Copy(1, 0, "backup/w", 3, "staging/w", 0)           # an orphan from rank 1's backup row 3
    move = Copy(2, 0, "w", 7, "staging/w", 1)
    fill_other = Copy(2, 1, "w", 4, "backup/w", 5)                # a re-homed backup into a free row
    fill_same = Copy(2, 1, "w", 4, "backup/w", 3)                 # ... into the row being restored from
    read_written = Copy(0, 3, "staging/w", 1, "backup/w", 0)      # reads a row the chunk writes
    assert in_order([restore, move], [fill_other]) == [[restore, move, fill_other]]
    assert in_order([restore, move], [fill_same]) == [[restore, move], [fill_same]]
    assert in_order([restore, move], [fill_other, read_written]) == [[restore, move], [fill_other, read_written]]
    assert in_order([], []) == [[]] and in_order([move], []) == [[move]] and in_order([], [fill_same]) == [[fill_same]]

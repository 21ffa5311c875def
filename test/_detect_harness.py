"""A blocked weight transfer and a blocked combine, each ended by a SIGKILL of the peer they wait
for: the ranks of ``test_failure_knowledge.py`` and ``bench/bench_detect.py``.

R = 4 ranks, each with a transport (``liveness=lv``) and a host dispatcher (``liveness=lv``), both
with timeouts far beyond any test (``TIMEOUT``), so only knowledge of the death can end the waits:

1. ``transfer``: ranks 0-2 ``execute`` copies that read rows of rank 3; rank 3 never calls
   ``execute`` (alive but idle) until the orchestrator SIGKILLs it. Survivors must raise
   ``PeerFailure`` naming rank 3.
2. ``combine``: ranks 0-2 dispatch one layer (rank 2 takes part), then rank 2 idles and is
   SIGKILLed while ranks 0-1 wait in ``combine``. The dispatcher must give up on rank 2 (the
   dispatcher contract: a dead peer never makes ``combine`` raise; it is marked failed in the
   state, its pairs renormalised).

``feed`` says where each rank's :class:`~sglang_elastic.transport.Liveness` learns of deaths:
``"membership"`` (a :class:`~sglang_elastic.membership.MembershipClient` whose watch connection
to the orchestrator's membership server feeds it), ``"hand"`` (a thread that reads ``dead/<rank>``
keys the orchestrator sets right after its kill), ``"none"`` (the transport's own detection only).
"""
from __future__ import annotations

import datetime
import os
import queue
import signal
import threading
import time
import traceback

import torch

HOST = "127.0.0.1"
R, VT, VC = 4, 3, 2  # ranks, the victim of the transfer phase, the victim of the combine phase
TIMEOUT = 3600.0  # every wait's own timeout: far beyond any test, so only knowledge ends it
L, E, S, HID, K, M = 1, 4, 2, 16, 2, 8
FEEDS = ("membership", "hand", "none")


def _hand_feed(port: int, lv, stop: threading.Event) -> None:
    """Feed ``lv`` from ``dead/<rank>`` store keys (a stand-in for a membership watch)."""
    store = torch.distributed.TCPStore(HOST, port, is_master=False, timeout=datetime.timedelta(seconds=60))
    keys = {r: f"dead/{r}" for r in range(R)}
    while not stop.is_set():
        for r, k in list(keys.items()):
            if store.check([k]):
                lv.mark_dead(r, "the orchestrator saw it die")
                del keys[r]
        time.sleep(0.002)


def worker(kind: str, rank: int, port: int, mport: int, feed: str, out) -> None:
    """One rank; reports ``(rank, phase, status, payload, wall_time)`` on ``out``."""
    try:
        from sglang_elastic.dispatch import make_dispatcher
        from sglang_elastic.state import ElasticEPState
        from sglang_elastic.transport import Copy, Liveness, PeerFailure, make_transport

        from _dispatch_harness import random_inputs, replicated_placement, run_local_experts

        store = torch.distributed.TCPStore(HOST, port, is_master=False, timeout=datetime.timedelta(seconds=120))
        lv = Liveness()
        known: dict = {}  # rank -> wall time this process learned of its death
        lv.add_listener(lambda r, reason: known.setdefault(r, (time.time(), reason)))
        stop = threading.Event()
        if feed == "membership":
            from sglang_elastic.membership import MembershipClient

            client = MembershipClient(HOST, mport, rank, liveness=lv, connect_timeout_s=60)
            client.join(timeout=60)
        elif feed == "hand":
            threading.Thread(target=_hand_feed, args=(port, lv, stop), daemon=True).start()
        t = make_transport(kind, rank, store, liveness=lv, connect_timeout_s=60)
        w = torch.arange(4 * 16, dtype=torch.float32).view(4, 16) + 100 * rank
        t.register("w", w)
        t.set_peers(list(range(R)))
        state = ElasticEPState(R, device="cpu")
        placement = replicated_placement(L, E, R, S, seed=7)
        d = make_dispatcher(kind, path="host", rank=rank, num_ranks=R, num_local_experts=S, hidden=HID, num_topk=K,
                            max_tokens_per_rank=M, placement=placement, state=state, store=store, dtype=torch.float32,
                            timeout_s=TIMEOUT, connect_timeout_s=60, liveness=lv, ns=f"detect/{kind}")
        store.set(f"ready/{rank}", "1")
        store.wait([f"ready/{r}" for r in range(R)])

        # ---- 1. a blocked transfer: rows of rank VT, which never calls execute
        if rank == VT:
            out.put((rank, "transfer", "idle", None, time.time()))
            time.sleep(3600)
        copies = [Copy(VT, r, "w", r, "w", 0) for r in range(R) if r != VT]
        out.put((rank, "transfer", "entered", None, time.time()))
        try:
            t.execute(copies, timeout_s=TIMEOUT)
            out.put((rank, "transfer", "returned", None, time.time()))
        except PeerFailure as exc:
            out.put((rank, "transfer", "peerfailure", {"rank": exc.rank, "msg": str(exc), "known": known.get(VT)},
                     time.time()))
        state.mark_failed([VT], reason="test: transfer victim")
        live = [r for r in range(R) if r != VT]
        store.set(f"phase2/{rank}", "1")
        store.wait([f"phase2/{r}" for r in live])

        # ---- 2. a blocked combine: rank VC dispatches, then idles while the others combine
        x, ids, wts, _ = random_inputs(11 + rank, M, HID, E, K, torch.float32)
        o = d.dispatch(x, ids, wts, layer=0)
        y = run_local_experts(o.hidden_states, placement, 0, rank)
        if rank == VC:
            out.put((rank, "combine", "idle", None, time.time()))
            time.sleep(3600)
        out.put((rank, "combine", "entered", None, time.time()))
        d.combine(y, o.handle)
        out.put((rank, "combine", "returned", {"live": state.live_ranks(), "failures": d.stats.peer_failures,
                                                "lost": d.stats.lost_pairs, "known": known.get(VC)}, time.time()))
        stop.set()
        out.put((rank, "done", "ok", None, time.time()))
    except BaseException:
        out.put((rank, "error", "error", traceback.format_exc(), time.time()))
    finally:  # NIXL's agent crashes its process at interpreter exit: leave without running it
        out.close()
        out.join_thread()
        os._exit(0)


PRELOAD = ["torch", "torch.distributed", "sglang_elastic.dispatch", "sglang_elastic.state", "sglang_elastic.transport",
           "sglang_elastic.dispatch.host_onesided", "_dispatch_harness"]


def run(kind: str, feed: str, limit_s: float = 120.0) -> dict:
    """Play both phases; returns ``{phase: {rank: (status, payload, seconds from the kill)}}``."""
    from _dispatch_harness import forkserver_context

    ctx = forkserver_context(PRELOAD)
    store = torch.distributed.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=120))
    server = None
    if feed == "membership":
        from sglang_elastic.membership import MembershipServer

        server = MembershipServer(HOST, 0, world_size=R, heartbeat_timeout_s=5.0)
    out = ctx.Queue()
    procs = {r: ctx.Process(target=worker, args=(kind, r, store.port, server.port if server else 0, feed, out),
                            daemon=True) for r in range(R)}
    for p in procs.values():
        p.start()
    end = time.monotonic() + limit_s
    seen: dict = {}
    results: dict = {"transfer": {}, "combine": {}}
    kill_at: dict = {}
    killed: set = set()

    def pump() -> None:
        try:
            rank, phase, status, payload, wall = out.get(timeout=max(0.05, min(0.2, end - time.monotonic())))
        except queue.Empty:
            return
        if status == "error":
            raise AssertionError(f"{kind}/{feed}: rank {rank} crashed:\n{payload}")
        crashed = [r for r, p in procs.items() if p.exitcode not in (None, 0) and r not in killed]
        if crashed:
            raise AssertionError(f"{kind}/{feed}: rank(s) {crashed} crashed (exit codes "
                                 f"{[procs[r].exitcode for r in crashed]})")
        seen[(rank, phase, status)] = (payload, wall)
        if phase in results and status in ("peerfailure", "returned"):
            if payload.get("known"):  # (seconds from the kill to this rank's Liveness knowing, who told it)
                payload["known"] = (payload["known"][0] - kill_at[phase], payload["known"][1])
            results[phase][rank] = (status, payload, wall - kill_at[phase])

    def kill(phase: str, victim: int, waiters) -> None:
        while not (all((r, phase, "entered") in seen for r in waiters) and (victim, phase, "idle") in seen):
            if time.monotonic() > end:
                raise AssertionError(f"{kind}/{feed}: ranks never reached {phase}: {sorted(seen)}")
            pump()
        time.sleep(0.3)  # let the waiters block
        kill_at[phase] = time.time()
        killed.add(victim)
        os.kill(procs[victim].pid, signal.SIGKILL)
        if feed == "hand":
            store.set(f"dead/{victim}", "1")
        while len(results[phase]) < len(waiters):
            if time.monotonic() > end:
                raise AssertionError(f"{kind}/{feed}: {phase} waits did not end within {limit_s}s: {results[phase]}")
            pump()

    try:
        kill("transfer", VT, [r for r in range(R) if r != VT])
        kill("combine", VC, [r for r in range(R) if r not in (VT, VC)])
        while not all((r, "done", "ok") in seen for r in range(R) if r not in (VT, VC)) and time.monotonic() < end:
            pump()
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)
        if server is not None:
            server.close()
    return results


def stop_forkserver() -> None:
    from _dispatch_harness import stop_forkserver as stop

    stop()

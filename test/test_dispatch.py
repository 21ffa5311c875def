"""Routing, layouts, input validation, and the torch dispatcher over real gloo processes.

The multi-process tests compare every rank's combined output with a single-process reference of
the same layer (same routing decisions, same float32 combine order) bit for bit, and kill a rank
with SIGKILL in the middle of a step.
"""
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import pytest
import torch

from sglang_elastic.dispatch import layout
from sglang_elastic.dispatch.base import Exchange, HostDispatcher
from sglang_elastic.dispatch.routing import RoutingTable, live_replica_counts, route
from sglang_elastic.eplb import Placement
from sglang_elastic.state import ElasticEPState

from _dispatch_harness import (free_port, random_inputs, reference_layer, replicated_placement,
                               run_local_experts)

# ---------------------------------------------------------------------------------------------- routing


def _table(phy2log, R):
    return RoutingTable.from_placement(Placement(torch.tensor(phy2log), R, max(max(r) for r in phy2log) + 1))


def test_replicas_share_tokens_evenly_and_deterministically():
    # expert 0 on slots 0 (rank 0) and 2 (rank 1); expert 1 on slot 1 and 3
    table = _table([[0, 1, 0, 1]], 2)
    ids = torch.zeros(100, 1, dtype=torch.int64)
    live = torch.ones(2, dtype=torch.int32)
    r1 = route(ids, torch.ones(100, 1), table, 0, live)
    r2 = route(ids, torch.ones(100, 1), table, 0, live)
    assert torch.equal(r1.phys, r2.phys)
    assert sorted(torch.bincount(r1.phys.flatten()).tolist()) == [0, 50, 50] or \
        torch.bincount(r1.phys.flatten(), minlength=4).tolist() == [50, 0, 50, 0]
    # The offset shifts the choice: another rank's token 0 may pick another replica.
    r3 = route(ids[:1], torch.ones(1, 1), table, 0, live, token_offset=1)
    assert r3.phys.item() != r1.phys[0].item()


def test_dead_rank_never_chosen_and_mask_flip_is_seen_in_place():
    table = _table([[0, 1, 2, 0, 1, 2]], 2)
    state = ElasticEPState(2, device="cpu")
    ids = torch.tensor([[0, 1], [2, 0], [1, 2]] * 20)
    w = torch.ones(60, 2)
    before = route(ids, w, table, 0, state.active_ranks)
    assert (before.phys // 3 == 1).any()
    state.mark_failed(1)
    after = route(ids, w, table, 0, state.active_ranks)  # same tensor object, updated in place
    assert (after.phys >= 0).all() and (after.phys // 3 == 0).all()
    assert after.stats.tolist() == [0, 0, 0]


def test_renormalize_policy_counts_and_rescales():
    # expert 2 lives only on rank 1
    table = _table([[0, 1, 0, 2]], 2)
    live = torch.tensor([1, 0], dtype=torch.int32)
    ids = torch.tensor([[0, 2], [1, 0], [2, -1]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    r = route(ids, w, table, 0, live)
    assert r.phys[0, 1] == -1 and r.phys[2, 0] == -1
    assert torch.allclose(r.weights[0], torch.tensor([1.0, 0.0]))
    assert torch.equal(r.weights[1], w[1])            # untouched token keeps exact weights
    assert r.weights[2].tolist() == [0.0, 0.0]        # lost every expert: output zero, counted
    assert r.affected.tolist() == [True, False, True]
    assert r.stats.tolist() == [2, 0, 2]


def test_reroute_policy_picks_best_live_alternative():
    table = _table([[0, 1, 3, 2, 0, 3]], 2)   # expert 2 only on rank 1 (slot 3)
    live = torch.tensor([1, 0], dtype=torch.int32)
    ids = torch.tensor([[2, 0]])
    logits = torch.tensor([[5.0, 1.0, 9.0, 3.0]])  # best alternative not in top-k: expert 3
    r = route(ids, torch.tensor([[0.7, 0.3]]), table, 0, live, policy="reroute", router_logits=logits)
    assert r.logical.tolist() == [[3, 0]]
    assert r.phys[0, 0].item() in (2,)  # expert 3's live replica (slot 2 on rank 0)
    assert torch.equal(r.weights, torch.tensor([[0.7, 0.3]]))
    assert r.stats.tolist() == [1, 1, 0]


def test_load_records_router_demand():
    table = _table([[0, 1, 2, 3]], 2)
    load = torch.zeros(4, dtype=torch.int64)
    ids = torch.tensor([[0, 1], [0, 3], [2, -1]])
    route(ids, torch.ones(3, 2), table, 0, torch.tensor([1, 0], dtype=torch.int32), load=load)
    assert load.tolist() == [2, 1, 1, 1]


def test_live_replica_counts():
    table = _table([[0, 1, 0, 2]], 2)
    assert live_replica_counts(table.log2phy[0], torch.tensor([1, 0]), 2).tolist() == [1, 1, 0]


def test_unknown_policy_and_reroute_without_logits():
    table = _table([[0, 1]], 1)
    with pytest.raises(ValueError, match="unknown degraded-token policy 'drop'"):
        route(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), table, 0, torch.ones(1), policy="drop")
    with pytest.raises(ValueError, match="needs router_logits"):
        route(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), table, 0, torch.ones(1), policy="reroute")


# ---------------------------------------------------------------------------------------------- layout


def test_send_plan_and_recv_positions_roundtrip():
    R, S, M = 3, 2, 5
    phys = torch.tensor([[5, 0], [1, -1], [0, 4], [3, 2]])
    plan = layout.send_plan(phys, R, S)
    assert plan.counts.tolist() == [[2, 1], [1, 1], [1, 1]]
    slots = phys.flatten()[plan.order]
    assert slots.tolist() == sorted(slots.tolist())
    # as a receiver of these counts from 3 sources: rows land in expert-major, source-ordered slots
    counts = torch.tensor([[2, 1], [0, 3], [1, 0]])
    pos, masked = layout.recv_positions(counts, M)
    assert masked.tolist() == [3, 4]
    assert pos.tolist() == [0, 1, R * M, R * M + 1, R * M + 2, R * M + 3, 2]


def test_fp8_roundtrip_is_close():
    x = torch.randn(4, 256)
    q, s = layout.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 2)
    assert torch.allclose(layout.dequantize_fp8(q, s), x, rtol=0.07, atol=1e-3)
    with pytest.raises(ValueError, match="divisible by 128"):
        layout.quantize_fp8(torch.randn(2, 100))


# ---------------------------------------------------------------------------------------------- validation


class _NoComm(Exchange):
    """Fails the test if anything is sent: validation must happen before communication."""

    calls = 0

    def run(self, *a, **k):
        _NoComm.calls += 1
        raise AssertionError("communication after invalid input")


def _host_dispatcher(**kw):
    args = dict(rank=0, num_ranks=2, num_local_experts=3, hidden=8, num_topk=2, max_tokens_per_rank=4,
                dtype=torch.float32, placement=Placement(torch.tensor([[0, 1, 2, 3, 0, 1]]), 2, 4),
                state=ElasticEPState(2, device="cpu"))
    args.update(kw)
    return HostDispatcher(_NoComm(), **args)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 7)), r"hidden_states must be \[tokens, 8\]"),
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), "dtype torch.float64 != the dispatcher's torch.float32"),
    (dict(x=torch.zeros(5, 8), ids=torch.zeros(5, 2, dtype=torch.int64), w=torch.ones(5, 2)),
     "5 tokens exceed max_tokens_per_rank=4"),
    (dict(ids=torch.zeros(2, 3, dtype=torch.int64)), r"must be \[2, 2\]"),
    (dict(ids=torch.zeros(2, 2)), "topk_ids must be int32 or int64"),
    (dict(ids=torch.tensor([[0, 4], [1, 2]])), r"expert id 4 out of range \[0, 4\)"),
    (dict(ids=torch.tensor([[0, -2], [1, 2]])), "expert id -2 out of range"),
    (dict(w=torch.ones(2, 2, dtype=torch.int64)), "topk_weights must be floating point"),
    (dict(layer=1), r"layer 1 out of range \[0, 1\)"),
])
def test_bad_inputs_fail_before_communication(bad, match):
    d = _host_dispatcher()
    x = bad.get("x", torch.zeros(2, 8))
    ids = bad.get("ids", torch.tensor([[0, 1], [2, 3]]))
    w = bad.get("w", torch.ones(2, 2))
    before = _NoComm.calls
    with pytest.raises(ValueError, match=match):
        d.dispatch(x, ids, w, layer=bad.get("layer", 0))
    assert _NoComm.calls == before
    assert int(d.load.sum()) == 0  # nothing recorded for a rejected call


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown degraded-token policy"):
        _host_dispatcher(policy="nope")
    with pytest.raises(ValueError, match="divisible by 128"):
        _host_dispatcher(use_fp8=True)
    with pytest.raises(ValueError, match="placement is for 2 ranks x 3 slots"):
        _host_dispatcher(num_local_experts=2)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        _host_dispatcher(rank=2)
    d = _host_dispatcher(placement=None)
    with pytest.raises(ValueError, match="no placement"):
        d.dispatch(torch.zeros(1, 8), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2))
    from sglang_elastic.dispatch import make_dispatcher
    with pytest.raises(ValueError, match="unknown dispatcher kind 'deepep'"):
        make_dispatcher("deepep", rank=0)


def test_single_rank_dispatch_matches_reference():
    """One rank: everything is local (no peers), the layout and combine still apply."""
    placement = Placement(torch.tensor([[0, 1, 2, 3, 0, 1]]), 1, 4)
    state = ElasticEPState(1, device="cpu")
    d = HostDispatcher(_NoComm(), rank=0, num_ranks=1, num_local_experts=6, hidden=8, num_topk=2,
                       max_tokens_per_rank=9, dtype=torch.float32, placement=placement, state=state)
    x, ids, w, _ = random_inputs(0, 9, 8, 4, 2, torch.float32)
    out = d.dispatch(x, ids, w)
    assert out.hidden_states.shape == (6, 9, 8) and int(out.masked_m.sum()) == int((ids >= 0).sum())
    got = d.combine(run_local_experts(out.hidden_states, placement, 0, 0), out.handle)
    ref, _ = reference_layer(x, ids, w, placement, 0, state.active_ranks, 0)
    assert torch.equal(got, ref)
    assert d.load[0].tolist() == torch.bincount(ids[ids >= 0], minlength=4).tolist()


# ---------------------------------------------------------------------------------------------- processes

L, E, R, S, HID, K, M = 2, 8, 3, 6, 32, 3, 24
TIMEOUT = 3.0


def _worker(rank, port, case, out):
    try:
        from sglang_elastic.dispatch import make_dispatcher

        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=__import__("datetime").timedelta(seconds=60))
        dtype, H = case["dtype"], case.get("H", HID)
        placement = replicated_placement(L, E, R, S, seed=case["seed"])
        state = ElasticEPState(R, device="cpu")
        d = make_dispatcher("torch", rank=rank, num_ranks=R, num_local_experts=S, hidden=H, num_topk=K,
                            max_tokens_per_rank=M, placement=placement, state=state, store=store, dtype=dtype,
                            timeout_s=TIMEOUT, policy=case.get("policy", "renormalize"), use_fp8=case.get("fp8", False))
        results = []
        for step in range(case["steps"]):
            for layer in range(L):
                seed = case["seed"] * 1000 + step * 10 + layer * 100 + rank
                T = int(torch.randint(0, M + 1, (1,), generator=torch.Generator().manual_seed(seed)))
                x, ids, w, logits = random_inputs(seed, T, H, E, K, dtype)
                mask_before = state.active_ranks.clone()
                t0 = time.monotonic()
                o = d.dispatch(x, ids, w, layer=layer, router_logits=logits)
                if rank == case.get("victim") and step == case.get("kill_step"):
                    os.kill(os.getpid(), signal.SIGKILL)  # dies between dispatch and combine
                y = run_local_experts(o.hidden_states, placement, layer, rank, o.hidden_states_scale, dtype)
                got = d.combine(y.to(dtype), o.handle)
                dt = time.monotonic() - t0
                ref, routed = reference_layer(x, ids, w, placement, layer, mask_before, rank * M,
                                              case.get("policy", "renormalize"), logits, case.get("fp8", False))
                exact = (got == ref).all(1)
                # Tokens with a pair on a rank that failed during this call follow the degraded policy.
                dead = state.active_ranks == 0
                lost = ((routed.phys >= 0) & dead[(routed.phys // S).clamp(min=0)]).any(1)
                results.append(dict(step=step, layer=layer, T=T, dt=dt, wrong=int((~exact).sum()),
                                    wrong_ok=int((~exact & ~routed.affected & ~lost).sum()),
                                    lost=int(lost.sum()), live=state.live_ranks()))
        out.put((rank, "ok", results, d.stats.as_dict()))
        d.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc(), None))


def _run(case, nranks=R, timeout=120, target=None):
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target or _worker, args=(r, port, case, out), daemon=True) for r in range(nranks)]
    for p in procs:
        p.start()
    res = {}
    deadline = time.monotonic() + timeout
    want = nranks - (1 if case.get("victim") is not None else 0)
    try:
        while len(res) < want and time.monotonic() < deadline:
            try:
                rank, status, payload, stats = out.get(timeout=1)
            except queue.Empty:
                continue
            assert status == "ok", f"rank {rank}:\n{payload}"
            res[rank] = (payload, stats)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        del store
    assert len(res) == want, f"only ranks {sorted(res)} reported"
    return res


@pytest.mark.parametrize("case", [
    dict(seed=1, steps=2, dtype=torch.float32),
    dict(seed=2, steps=2, dtype=torch.bfloat16, policy="reroute"),
    dict(seed=3, steps=1, dtype=torch.bfloat16, fp8=True, H=256),
], ids=["fp32", "bf16-reroute", "fp8"])
def test_torch_dispatcher_matches_reference(case):
    for rank, (results, stats) in _run(case).items():
        for r in results:
            assert r["wrong"] == 0, (rank, r)
        assert stats["peer_failures"] == 0 and stats["lost_pairs"] == 0


def test_torch_dispatcher_survives_a_killed_rank():
    """Rank 2 dies between dispatch and combine of step 1; the survivors finish that step (pairs that
    went to rank 2 are renormalised away and counted), mark it failed, and from step 2 on every token
    is exact again (every expert has a live replica)."""
    case = dict(seed=4, steps=4, dtype=torch.float32, victim=2, kill_step=1)
    res = _run(case)
    for rank, (results, stats) in res.items():
        by_step = {}
        for r in results:
            by_step.setdefault(r["step"], []).append(r)
        assert all(r["wrong"] == 0 for r in by_step[0])
        # The step in which rank 2 died completes within the timeout (plus scheduling slack), and
        # only tokens with a pair on rank 2 differ from the reference.
        assert max(r["dt"] for r in by_step[1]) < TIMEOUT + 2.0
        assert all(r["wrong_ok"] == 0 for r in by_step[1])
        assert all(r["live"] == [0, 1] for r in by_step[1])
        lost = sum(r["lost"] for r in by_step[1])
        assert lost > 0 and stats["lost_pairs"] >= lost and stats["affected_tokens"] >= lost
        for step in (2, 3):
            for r in by_step[step]:
                assert r["wrong"] == 0 and r["live"] == [0, 1], (rank, r)
        assert stats["peer_failures"] == 1


# ------------------------------------------------------------------------------ broken until rebuilt

LATE = 2.0  # the deadline of the exchange left by knowledge: its gloo work times out then, after the rebuild


def _broken_worker(rank, port, case, out):
    """Two ranks. (1) A wait on a raw group left by knowledge (deadline an hour away) marks that
    group broken. (2) Rank 0's exchange is left by knowledge while rank 1 stays silent (its gloo
    work stays posted, to time out at LATE); rank 1 was alive after all: both rebuild with
    set_peers(rebuild=True), the old group's late timeout passes, and the new group moves rows
    exactly both ways, nobody recorded dead."""
    import datetime
    import threading

    from sglang_elastic.dispatch.torch_a2a import TorchExchange
    from sglang_elastic.transport import Liveness, PairWaiter, PeerFailure, form_group

    try:
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
        res = {}
        lv = Liveness()
        raw = form_group(store, "test/raw", ((0, 1), (1, 1)), rank, 1, torch.device("cpu"), 60, "127.0.0.1")
        if rank == 0:
            work = raw.gloo.recv([torch.empty(4)], 1, 7)     # rank 1 never sends it
            threading.Timer(0.2, lv.mark_dead, args=(1, "test: known dead")).start()
            p, exc = PairWaiter(raw, {1: [work]}, time.monotonic() + 3600, lv, "a test wait").next(
                time.monotonic() + 3600)
            res["knowledge"] = (p, isinstance(exc, PeerFailure), raw.broken)
            lv.mark_alive(1)
        store.set(f"raw/{rank}", "1")
        store.wait([f"raw/{1 - rank}"])

        ex = TorchExchange(rank, store, device=torch.device("cpu"), liveness=lv, ns="test/broken")
        ex.set_peers([0, 1])
        old = ex.group
        W = 8

        def send(n, v):
            hdr = torch.tensor([1, 1, n, 0], dtype=torch.int64)
            return hdr, torch.full((n, W), v, dtype=torch.uint8)

        t_first = time.monotonic()
        if rank == 0:
            threading.Timer(0.2, lv.mark_dead, args=(1, "test: known dead")).start()
            got, failed = ex.run(1, 1, {1: send(3, 5)}, W, t_first + LATE)
            res["first"] = (sorted(got), failed, ex.broken, ex.run(2, 1, {1: send(1, 1)}, W, t_first + LATE))
            lv.mark_alive(1)   # membership kept it: re-admitted
        store.set(f"first/{rank}", "1")
        store.wait([f"first/{1 - rank}"])
        ex.set_peers([0, 1], rebuild=True)
        res["rebuilt"] = (ex.group is not old, ex.broken)
        time.sleep(max(0.0, t_first + LATE + 1.0 - time.monotonic()))  # past the old group's deadline
        got, failed = ex.run(3, 1, {1 - rank: send(2 + rank, 10 + rank)}, W, time.monotonic() + 60)
        hdr, rows = got[1 - rank]
        res["second"] = (failed, ex.broken, int(hdr[2]), rows.tolist() == [[11 - rank] * W] * (3 - rank))
        res["dead"] = sorted(lv.dead())
        out.put((rank, "ok", res, None))
    except Exception:
        out.put((rank, "error", traceback.format_exc(), None))
    out.close()
    out.join_thread()
    os._exit(0)  # helper threads of the abandoned waits may still block; nothing is left to flush


def test_torch_group_broken_by_knowledge_until_rebuilt():
    res = {r: payload for r, (payload, _) in _run({}, nranks=2, target=_broken_worker).items()}
    assert res[0]["knowledge"] == (1, True, True)          # left by knowledge: the group is broken
    got, failed, broken, again = res[0]["first"]
    assert got == [] and failed == [1] and broken           # ... and so is the dispatcher's
    assert again == ({}, [])                                # nothing moves on it, nobody is blamed
    for r in (0, 1):
        assert res[r]["rebuilt"] == (True, False)
        # the old group's late timeout did not touch the new one; rows move exactly both ways
        assert res[r]["second"] == ([], False, 3 - r, True), res[r]
        assert res[r]["dead"] == []

"""The host-path one-sided dispatchers (``nixl``: NIXL agent over UCX, ``mooncake``: Mooncake
TransferEngine over TCP) on real processes over 127.0.0.1.

Every rank's combined output is compared bit for bit with a single-process reference of the same
layer (same routing decisions with ``token_offset = rank * M``, the same deterministic per-expert
elementwise function, the same float32 combine order). Failure tests SIGKILL a rank between or
inside steps, check that the survivors finish in time, route around it and stay exact, then bring
a new incarnation of the rank back without rebuilding the survivors.

NIXL's agent crashes its process at interpreter exit, so every rank runs in a child process that
leaves with ``os._exit``; the TCPStore is served by the test process, as the orchestrator would.
"""
from __future__ import annotations

import datetime
import os
import queue
import signal
import sys
import time
import traceback

import pytest
import torch

from sglang_elastic.state import ElasticEPState

from _dispatch_harness import (forkserver_context, free_port, random_inputs, reference_layer, replicated_placement,
                               run_local_experts, stop_forkserver)

KINDS = ("nixl", "mooncake")
L, E, S, HID, K, M = 2, 8, 6, 32, 3, 24
TIMEOUT = 3.0


def _require(kind: str) -> None:
    mod = {"nixl": "nixl._api", "mooncake": "mooncake.engine"}[kind]
    try:
        __import__(mod)
    except Exception as exc:
        pytest.fail(f"library for the {kind!r} dispatcher is missing ({exc}); run bash .ci/setup --test")


# ---------------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("kind,module,package", [("nixl", "nixl._api", "nixl-cu12"),
                                                 ("mooncake", "mooncake.engine", "mooncake-transfer-engine-non-cuda")])
def test_missing_library_names_the_package(monkeypatch, kind, module, package):
    from sglang_elastic.dispatch import make_dispatcher

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=package):
        make_dispatcher(kind, path="host", store=None, rank=0, num_ranks=2, num_local_experts=2, hidden=8,
                        num_topk=2, max_tokens_per_rank=4)


# ---------------------------------------------------------------------------------------------- processes


def _steps(d, kind, rank, R, placement, state, case, steps, first_step, results, victim_dies=None):
    """Run ``steps`` steps of L layers; record, per layer (and micro-batch), how the output compares
    with the reference. ``case["micro"] = 2`` overlaps two micro-batches per layer the way two-batch
    overlap does: dispatch a, dispatch b, combine a, combine b."""
    dtype, H, fp8 = case["dtype"], case.get("H", HID), case.get("fp8", False)
    policy = case.get("policy", "renormalize")
    for step in range(first_step, first_step + steps):
        if victim_dies == ("between", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if victim_dies == ("freeze", step):
            os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: only the deadline can catch it
        for layer in range(L):
            mbs = []
            t0 = time.monotonic()
            for mb in range(case.get("micro", 1)):
                seed = case["seed"] * 1000 + step * 10 + layer * 100 + rank + mb * 50000
                T = int(torch.randint(0, M + 1, (1,), generator=torch.Generator().manual_seed(seed)))
                x, ids, w, logits = random_inputs(seed, T, H, E, K, dtype)
                mask_before = state.active_ranks.clone()
                o = d.dispatch(x, ids, w, layer=layer, router_logits=logits)
                mbs.append((T, x, ids, w, logits, mask_before, o))
            if victim_dies == ("inside", step) and layer == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # dies between dispatch and combine
            outs = []
            for T, x, ids, w, logits, mask_before, o in mbs:
                y = run_local_experts(o.hidden_states, placement, layer, rank, o.hidden_states_scale, dtype)
                outs.append(d.combine(y.to(dtype), o.handle))
            dt = time.monotonic() - t0
            for mb, ((T, x, ids, w, logits, mask_before, o), got) in enumerate(zip(mbs, outs)):
                ref, routed = reference_layer(x, ids, w, placement, layer, mask_before, rank * M, policy, logits, fp8)
                exact = (got == ref).all(1)
                # Tokens with a pair on a rank that failed during this call follow the degraded policy.
                dead = state.active_ranks == 0
                lost = ((routed.phys >= 0) & dead[(routed.phys // S).clamp(min=0)]).any(1)
                results.append(dict(step=step, layer=layer, mb=mb, T=T, dt=dt, wrong=int((~exact).sum()),
                                    wrong_ok=int((~exact & ~routed.affected & ~lost).sum()),
                                    lost=int(lost.sum()), live=state.live_ranks(), tag=case.get("tag", "")))


def _worker(kind, rank, port, R, cases, out, role="rank"):
    """One rank. ``cases`` run one after the other, each with a dispatcher of its own."""
    try:
        from sglang_elastic.dispatch import make_dispatcher

        if os.environ.get("SGLD_TEST_LOG"):  # debugging: the dispatchers' logs, and stacks of a hung rank
            import faulthandler
            import logging

            logging.basicConfig(level=logging.INFO, format=f"%(relativeCreated)d r{rank} %(message)s")
            faulthandler.dump_traceback_later(25)

        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
        results, stats = [], {}
        for ci, case in enumerate(cases):
            dtype, H = case["dtype"], case.get("H", HID)
            placement = replicated_placement(L, E, R, S, seed=case["seed"])
            victim = case.get("victim")
            state = ElasticEPState(R, device="cpu")
            d = make_dispatcher(kind, path="host", rank=rank, num_ranks=R, num_local_experts=S, hidden=H, num_topk=K,
                                max_tokens_per_rank=M, placement=placement, state=state, store=store, dtype=dtype,
                                timeout_s=TIMEOUT, policy=case.get("policy", "renormalize"),
                                use_fp8=case.get("fp8", False), ns=f"test/{kind}/{ci}",
                                exchange_opts={**case.get("opts", {}), **case.get(f"{kind}_opts", {})})
            steps = case["steps"]
            if role == "replacement":  # a new incarnation of the victim, admitted by the survivors
                store.set("rejoin/up", "1")
                store.wait([f"rejoin/admitted/{r}" for r in range(R) if r != rank])
                _steps(d, kind, rank, R, placement, state, case, case["rejoin_steps"], steps, results)
            else:
                dies = (case["kill_when"], case["kill_step"]) if rank == victim else None
                _steps(d, kind, rank, R, placement, state, case, steps, 0, results, dies)
                if case.get("rejoin_steps"):
                    store.wait(["rejoin/up"])
                    t0 = time.monotonic()
                    d.set_peers(range(R))  # connects the new incarnation; nothing else is rebuilt
                    state.mark_joined(victim, reason="test: replacement is up")
                    results.append(dict(step=-1, connect_s=time.monotonic() - t0))
                    store.set(f"rejoin/admitted/{rank}", "1")
                    _steps(d, kind, rank, R, placement, state, case, case["rejoin_steps"], steps, results)
            stats[case.get("tag", ci)] = d.stats.as_dict()
            d.close()
        out.put((rank, role, "ok", results, stats))
    except BaseException:
        out.put((rank, role, "error", traceback.format_exc(), None))
    finally:  # NIXL's agent segfaults at interpreter exit: leave without running it
        out.close()
        out.join_thread()
        os._exit(0)


def _ctx():
    """Ranks fork from a forkserver with torch preloaded (spawning each one costs seconds on 2 cores)."""
    return forkserver_context(["torch", "torch.distributed", "sglang_elastic.dispatch", "sglang_elastic.state",
                               "sglang_elastic.dispatch.host_onesided", "_dispatch_harness"])


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    yield
    stop_forkserver()


def _run(kind, R, cases, timeout=90):
    """Run ``cases`` on R ranks; with a victim and ``rejoin_steps``, start its replacement once it died.
    Returns {(rank, role): (results, stats)}."""
    _require(kind)
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = _ctx()
    out = ctx.Queue()
    procs = {r: ctx.Process(target=_worker, args=(kind, r, port, R, cases, out), daemon=True) for r in range(R)}
    for p in procs.values():
        p.start()
    victim = next((c["victim"] for c in cases if c.get("victim") is not None), None)
    rejoin = any(c.get("rejoin_steps") for c in cases)
    want = R - (victim is not None) + (rejoin and victim is not None)
    extra = []
    res = {}
    deadline = time.monotonic() + timeout
    try:
        while len(res) < want and time.monotonic() < deadline:
            if rejoin and not extra and not procs[victim].is_alive():
                assert procs[victim].exitcode == -signal.SIGKILL, f"victim exit code {procs[victim].exitcode}"
                p = ctx.Process(target=_worker, args=(kind, victim, port, R, cases, out, "replacement"), daemon=True)
                p.start()
                extra.append(p)
            try:
                rank, role, status, payload, stats = out.get(timeout=0.2)
            except queue.Empty:
                continue
            assert status == "ok", f"{kind} rank {rank} ({role}):\n{payload}"
            res[(rank, role)] = (payload, stats)
    finally:
        if victim is not None and procs[victim].is_alive():  # a frozen victim never ends by itself
            procs[victim].kill()
        for p in list(procs.values()) + extra:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(5)
        del store
    assert len(res) == want, f"{kind}: only {sorted(res)} reported within {timeout}s"
    return res


@pytest.mark.parametrize("kind,R", [("nixl", 3), ("mooncake", 4)])
def test_matches_reference(kind, R):
    """Random T <= M, top-k, replicated placements: fp32 (renormalize; one receive buffer per phase,
    enough when dispatch and combine alternate), bf16 (reroute; Mooncake writes the slot after the
    rows as it does over RDMA), bf16 with fp8 dispatch (H=256; the reference runs the experts on the
    dequantised rows), and two overlapped micro-batches per layer (the default two receive buffers),
    all bit-exact."""
    cases = [dict(seed=1, steps=2, dtype=torch.float32, opts=dict(recv_buffers=1), tag="fp32"),
             dict(seed=2, steps=1, dtype=torch.bfloat16, policy="reroute", tag="bf16-reroute",
                  mooncake_opts=dict(split_slot=True)),
             dict(seed=3, steps=1, dtype=torch.bfloat16, fp8=True, H=256, tag="fp8"),
             dict(seed=6, steps=1, dtype=torch.float32, micro=2, tag="tbo")]
    res = _run(kind, R, cases)
    for (rank, _), (results, stats) in res.items():
        assert {r["tag"] for r in results} == {"fp32", "bf16-reroute", "fp8", "tbo"}
        for r in results:
            assert r["wrong"] == 0, (kind, rank, r)
            assert r["live"] == list(range(R))
        for tag, st in stats.items():
            assert st["peer_failures"] == 0 and st["lost_pairs"] == 0, (kind, rank, tag, st)


@pytest.mark.parametrize("kind,when", [("nixl", "inside"), ("nixl", "between"), ("mooncake", "inside"),
                                       ("mooncake", "between")])
def test_survives_a_killed_rank_and_takes_it_back(kind, when):
    """Rank 2 of 3 is SIGKILLed at step 1 (``inside``: between dispatch and combine of layer 1;
    ``between``: before the step's first dispatch). The survivors finish that step within the timeout,
    mark it failed, and only tokens with a pair on rank 2 differ (renormalised and counted); from
    step 2 on every token is exact (every expert has a live replica). Then a new incarnation of rank 2
    starts, the survivors ``set_peers`` it (connecting one peer, rebuilding nothing) and mark it
    joined, and all three run exact steps again."""
    R, victim = 3, 2
    case = dict(seed=4, steps=3, dtype=torch.float32, victim=victim, kill_step=1, kill_when=when, rejoin_steps=1,
                tag="kill")
    res = _run(kind, R, [case])
    for (rank, role), (results, stats) in res.items():
        st = stats["kill"]
        if role == "replacement":
            assert all(r["wrong"] == 0 and r["live"] == [0, 1, 2] for r in results), results
            assert st["peer_failures"] == 0
            continue
        by_step = {}
        for r in results:
            by_step.setdefault(r["step"], []).append(r)
        assert all(r["wrong"] == 0 for r in by_step[0]), by_step[0]
        # The step in which rank 2 died completes within the timeout (plus scheduling slack), and only
        # tokens with a pair on rank 2 differ from the reference.
        assert max(r["dt"] for r in by_step[1]) < TIMEOUT + 2.0, by_step[1]
        assert all(r["wrong_ok"] == 0 for r in by_step[1]), by_step[1]
        assert by_step[1][-1]["live"] == [0, 1]
        lost = sum(r["lost"] for r in by_step[1])
        assert lost > 0 and st["lost_pairs"] >= lost and st["affected_tokens"] >= lost, (lost, st)
        assert all(r["wrong"] == 0 and r["live"] == [0, 1] for r in by_step[2]), by_step[2]
        assert st["peer_failures"] == 1
        assert by_step[-1][0]["connect_s"] < 5.0
        assert all(r["wrong"] == 0 and r["live"] == [0, 1, 2] for r in by_step[3]), by_step[3]


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_rank_is_given_up_at_the_deadline(kind):
    """Rank 2 of 3 SIGSTOPs itself before step 1: its sockets stay open, so nothing fails fast. The
    survivors give up on it when the call's deadline passes (``timeout_s``, not later), mark it failed,
    and step 2 is exact without it."""
    R, victim = 3, 2
    case = dict(seed=5, steps=3, dtype=torch.float32, victim=victim, kill_step=1, kill_when="freeze", tag="freeze")
    res = _run(kind, R, [case])
    for (rank, role), (results, stats) in res.items():
        by_step = {}
        for r in results:
            by_step.setdefault(r["step"], []).append(r)
        assert all(r["wrong"] == 0 for r in by_step[0]), by_step[0]
        dt = max(r["dt"] for r in by_step[1])
        assert TIMEOUT - 0.2 < dt < TIMEOUT + 2.0, by_step[1]
        assert all(r["wrong_ok"] == 0 and r["live"] == [0, 1] for r in by_step[1]), by_step[1]
        assert all(r["wrong"] == 0 and r["live"] == [0, 1] for r in by_step[2]), by_step[2]
        assert stats["freeze"]["peer_failures"] == 1 and stats["freeze"]["lost_pairs"] > 0

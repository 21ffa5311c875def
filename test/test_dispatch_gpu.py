"""GPU-path dispatchers: ``nixl`` (nixl_ep) and ``mooncake`` (Mooncake EP).

On any machine (CI):
* a missing library raises ImportError naming the wheel; bad arguments raise ValueError;
* the data flow of both dispatchers runs against fake ``nixl_ep`` / Mooncake EP buffers (two ranks
  as threads of this process, the fake moving rows in DeepEP's low-latency layout), bit-exact
  against the single-process reference, including a peer that dies mid-step;
* the Triton routing / post-combine kernels agree with their torch fallbacks under
  ``TRITON_INTERPRET=1`` (one subprocess, this file run as a script).

With CUDA, nixl_ep and two GPUs: two real processes dispatch through nixl_ep and are compared with
the reference (bf16 within bf16 rounding of the combine, fp8 within fp8 quantisation).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import Dict, List

import pytest
import torch

# dispatch._kernels loads kernels/ from the tree when the package is used uninstalled (GPU machines).
from sglang_elastic.dispatch._kernels import kernels as KR
from sglang_elastic.dispatch import layout, make_dispatcher
from sglang_elastic.dispatch import nixl_ep as nx
from sglang_elastic.dispatch.routing import RoutingTable, route
from sglang_elastic.eplb import Placement
from sglang_elastic.state import ElasticEPState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dispatch_harness import (expert_coeffs, free_port, random_inputs, reference_layer,  # noqa: E402
                               replicated_placement, run_local_experts)

L, E, R, S, HID, K, M = 2, 8, 2, 8, 256, 4, 16
_REAL_CHECK = nx._check_gpu_device
MARK = "GPU-PATH-RESULTS "


# ---------------------------------------------------------------------------------------------- fakes

class _World:
    """What the ranks of a fake EP group share: posted tensors per (phase, rank), a barrier, the dead."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.posted: Dict[tuple, tuple] = {}
        self.dead: set = set()


class _FakeEPCore:
    """DeepEP low-latency semantics in torch: each (token, expert) pair is one row, expert ``e``'s
    rows from source 0 first, combine sums ``w * row`` in float32 in top-k order. A dead source
    sends nothing; the survivor flags it gone (nixl_ep: masks it; Mooncake: ``active = 0``)."""

    world: _World

    def _setup(self, rank: int, num_ranks: int, S: int) -> None:
        self.rank, self.R, self.S = rank, num_ranks, S

    def _gone(self, src: int) -> bool:
        raise NotImplementedError

    def _flag_gone(self, src: int) -> None:
        raise NotImplementedError

    def _dispatch(self, x, topk_idx, M, use_fp8):
        w, R, S, H = self.world, self.R, self.S, x.shape[1]
        w.posted[("d", self.rank)] = (x, topk_idx)
        w.barrier.wait()
        recv = torch.zeros(S, R * M, H, dtype=x.dtype)
        src_info = torch.full((S, R * M), -1, dtype=torch.int32)
        rng = torch.zeros(S, R, dtype=torch.int64)
        count = torch.zeros(S, dtype=torch.int32)
        for src in range(R):
            if src in w.dead and src != self.rank:
                self._flag_gone(src)
        for e in range(S):
            gid, o = self.rank * S + e, 0
            for src in range(R):
                if self._gone(src) and src != self.rank:
                    continue
                xs, ids = w.posted[("d", src)]
                toks = (ids == gid).any(1).nonzero().flatten()
                n = toks.numel()
                recv[e, o:o + n] = xs[toks]
                src_info[e, o:o + n] = toks.to(torch.int32)
                rng[e, src] = (o << 32) | n
                o += n
            count[e] = o
        w.barrier.wait()
        if use_fp8:
            q, s = layout.quantize_fp8(recv.view(-1, H))
            return (q.view(S, R * M, H), s.view(S, R * M, H // layout.FP8_BLOCK)), count, (src_info, rng, M, H)
        return recv, count, (src_info, rng, M, H)

    def _combine(self, y, topk_idx, topk_weights, handle):
        w, R, S = self.world, self.R, self.S
        w.posted[("c", self.rank)] = (y, handle)
        w.barrier.wait()
        for src in range(R):
            if src in w.dead and src != self.rank:
                self._flag_gone(src)
        T, Kk = topk_idx.shape
        H = y.shape[2]
        pair = torch.zeros(T, Kk, H, dtype=y.dtype)
        for dst in range(R):
            if self._gone(dst) and dst != self.rank:
                continue
            yd, (src_info, rng, _, _) = w.posted[("c", dst)]
            for e in range(S):
                begin, n = int(rng[e, self.rank]) >> 32, int(rng[e, self.rank]) & 0xFFFFFFFF
                if not n:
                    continue
                toks = src_info[e, begin:begin + n].to(torch.int64)
                k = (topk_idx[toks] == dst * S + e).to(torch.int64).argmax(1)
                pair[toks, k] = yd[e, begin:begin + n]
        w.barrier.wait()
        return layout.weighted_sum(pair, topk_weights, y.dtype)


class FakeNixlBuffer(_FakeEPCore):
    """Stands in for ``nixl_ep.Buffer`` (low-latency API, mask buffer, one update_memory_buffers)."""

    def __init__(self, rank=0, low_latency_mode=True, explicitly_destroy=False, tcp_store_group=None,
                 timeout_ms=30000, **_):
        assert low_latency_mode and tcp_store_group is not None
        self.rank, self.timeout_ms, self.sized, self.destroyed, self.peers = rank, timeout_ms, False, False, set()

    @staticmethod
    def get_rdma_size_hint(M, H, R, num_experts):
        return 2 * num_experts * M * (H * 2 + 16)

    def update_memory_buffers(self, num_ranks, num_experts_per_rank, num_rdma_bytes, num_nvl_bytes=0):
        if self.sized:
            raise RuntimeError("Multiple calls to update_memory_buffers are not supported")
        self.sized, self.bytes = True, num_rdma_bytes
        self._setup(self.rank, num_ranks, num_experts_per_rank)
        self.mask = torch.ones(num_ranks, dtype=torch.int32)
        self.mask[self.rank] = 0

    def connect_ranks(self, ranks, activate=True):
        for r in ranks:
            if r != self.rank:
                self.peers.add(r)
                self.mask[r] = 0 if activate else 1

    def disconnect_ranks(self, ranks):
        for r in ranks:
            self.peers.discard(r)
            self.mask[r] = 1

    def query_mask_buffer(self, out):
        out.copy_(self.mask)

    def update_mask_buffer(self, rank_to_mask, mask=False):
        self.mask[rank_to_mask] = 1 if mask else 0

    def destroy(self):
        self.destroyed = True

    def _gone(self, src):
        return bool(self.mask[src])

    def _flag_gone(self, src):
        self.mask[src] = 1

    def dispatch(self, x, topk_idx, M, num_experts=None, use_fp8=True, async_finish=False, return_recv_hook=False):
        assert x.dtype == torch.bfloat16 and topk_idx.dtype == torch.int32 and x.is_contiguous()  # as nixl 1.4
        recv, count, handle = self._dispatch(x, topk_idx, M, use_fp8)
        return recv, count, handle, None, None

    def combine(self, x, topk_idx, topk_weights, handle, async_finish=False, return_recv_hook=False, **_):
        assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32 and topk_idx.dtype == torch.int32
        return self._combine(x, topk_idx, topk_weights, handle), None, None


class FakeMooncakeBuffer(_FakeEPCore):
    """Stands in for ``mooncake.mooncake_ep_buffer.Buffer``: a timed-out peer gets active_ranks = 0."""

    def __init__(self, group, num_ep_buffer_bytes=0):
        self.group, self.bytes, self.updates = group, num_ep_buffer_bytes, 0
        self._setup(group.rank(), group.size(), group.S)
        self._active = None

    @staticmethod
    def get_ep_buffer_size_hint(M, H, R, num_experts):
        return 2 * num_experts * M * (H * 2 + 16)

    def update_ep_member(self):
        self.updates += 1

    def _gone(self, src):
        return not bool(self._active[src])

    def _flag_gone(self, src):
        self._active[src] = 0

    def dispatch(self, x, topk_idx, active_ranks, M, num_experts, timeout_us, use_fp8=True, async_finish=False,
                 return_recv_hook=False):
        assert active_ranks.dtype == torch.int32 and active_ranks.numel() == self.R and timeout_us != 0
        self._active = active_ranks
        recv, count, (si, rng, m, h) = self._dispatch(x, topk_idx, M, use_fp8)
        return recv, count, (si, rng, m, h, num_experts), None, None

    def combine(self, x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy=False,
                async_finish=False, return_recv_hook=False, out=None):
        self._active = active_ranks
        return self._combine(x, topk_idx, topk_weights, handle[:4]), None, None


class _Group:
    def __init__(self, rank, size, S):
        self._rank, self._size, self.S = rank, size, S

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.fixture
def fake_nixl(monkeypatch):
    """``nixl_ep`` replaced by the fake; the dispatchers accept CPU tensors; buffers forgotten after."""
    mod = types.ModuleType("nixl_ep")
    mod.Buffer = FakeNixlBuffer
    mod.topk_idx_t = torch.int32  # as in the nixl-cu13 1.4 wheel
    monkeypatch.setitem(sys.modules, "nixl_ep", mod)
    monkeypatch.setattr(nx, "_check_gpu_device", lambda device, what: None)
    nx.release_buffers()
    yield mod
    nx.release_buffers()


@pytest.fixture
def fake_mooncake(monkeypatch):
    from sglang_elastic.dispatch import mooncake_ep as mc

    monkeypatch.setattr(mc, "import_mooncake_ep", lambda: FakeMooncakeBuffer)
    monkeypatch.setattr(mc, "_check_gpu_device", lambda device, what: None)
    mc.release_buffers()
    yield mc
    mc.release_buffers()


def _kw(**over):
    kw = dict(rank=0, num_ranks=R, num_local_experts=S, hidden=HID, num_topk=K, max_tokens_per_rank=M,
              device="cpu", dtype=torch.bfloat16, kernel_backend="torch")
    kw.update(over)
    return kw


# ---------------------------------------------------------------------------------------------- errors

def test_nixl_missing_library_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_ep", None)
    with pytest.raises(ImportError, match=r"nixl-cu12.*nixl-cu13"):
        make_dispatcher("nixl", path="gpu", store=object(), **_kw(device="cuda"))


def test_mooncake_missing_library_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.mooncake_ep_buffer", None)
    with pytest.raises(ImportError, match="mooncake-transfer-engine"):
        make_dispatcher("mooncake", path="gpu", group=None, **_kw(device="cuda"))


def test_modules_import_without_the_libraries():
    code = ("import sys; sys.modules['nixl_ep'] = None; sys.modules['triton'] = None; "
            "import sglang_elastic.dispatch.nixl_ep, sglang_elastic.dispatch.mooncake_ep; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_nixl_validation(fake_nixl, monkeypatch):
    placement = Placement.trivial(L, E, R, S)
    with pytest.raises(ValueError, match="bfloat16"):
        nx.NixlEPDispatcher(store=object(), placement=placement, **_kw(dtype=torch.float32))
    with pytest.raises(ValueError, match="store="):
        nx.NixlEPDispatcher(store=None, placement=placement, **_kw())
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        nx.NixlEPDispatcher(store=object(), num_rdma_bytes=0, placement=placement, **_kw())
    with pytest.raises(ValueError, match="kernel_backend"):
        nx.NixlEPDispatcher(store=object(), placement=placement, **_kw(kernel_backend="cuda"))
    with pytest.raises(ValueError, match="outside the EP group"):
        nx.NixlEPDispatcher(store=object(), placement=placement, connect=False, **_kw()).set_peers([5])
    monkeypatch.setattr(nx, "_check_gpu_device", _REAL_CHECK)
    with pytest.raises(ValueError, match="device='cuda'"):
        nx.NixlEPDispatcher(store=object(), placement=placement, **_kw())


def test_nixl_bad_inputs_raise_before_communication(fake_nixl):
    d = nx.NixlEPDispatcher(store=object(), placement=Placement.trivial(L, E, R, S), connect=False, **_kw())
    x, ids, w, _ = random_inputs(0, 4, HID, E, K, torch.bfloat16)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        d.dispatch(torch.zeros(M + 1, HID, dtype=torch.bfloat16), torch.zeros(M + 1, K, dtype=torch.int64),
                   torch.ones(M + 1, K))
    with pytest.raises(ValueError, match="expert id"):
        d.dispatch(x, ids + E, w)
    with pytest.raises(ValueError, match="dtype"):
        d.dispatch(x.float(), ids, w)
    d.close()
    with pytest.raises(RuntimeError, match="closed"):
        d.dispatch(x, ids, w)


def test_mooncake_validation(fake_mooncake):
    mc = fake_mooncake
    placement = Placement.trivial(L, E, R, S)
    g = _Group(0, R, S)
    with pytest.raises(ValueError, match="group="):
        mc.MooncakeEPDispatcher(group=None, placement=placement, **_kw())
    with pytest.raises(ValueError, match="size 3"):
        mc.MooncakeEPDispatcher(group=_Group(0, 3, S), placement=placement, **_kw())
    with pytest.raises(ValueError, match="at most 1024"):
        mc.MooncakeEPDispatcher(group=g, placement=placement, **_kw(max_tokens_per_rank=1025))
    with pytest.raises(ValueError, match="bfloat16"):
        mc.MooncakeEPDispatcher(group=g, placement=placement, **_kw(dtype=torch.float16))
    with pytest.raises(ValueError, match="timeout_us"):
        mc.MooncakeEPDispatcher(group=g, placement=placement, timeout_us=0, **_kw())
    d = mc.MooncakeEPDispatcher(group=g, placement=placement, **_kw())
    assert d.timeout_us == int(d.timeout_s * 1e6) and d._timeout() == -1  # the first call waits
    d.set_peers([0, 1])
    assert d.buffer.updates == 1
    with pytest.raises(ValueError, match="outside"):
        d.set_peers([0, 7])


def test_shared_buffer_is_reused_and_grown(fake_nixl):
    placement = Placement.trivial(L, E, R, S)
    a = nx.NixlEPDispatcher(store=object(), placement=placement, connect=False, **_kw())
    b = nx.NixlEPDispatcher(store=object(), placement=placement, connect=False, **_kw())
    assert a._shared is b._shared and a.buffer is b.buffer and a._shared.users == 2
    first = a.buffer
    c = nx.NixlEPDispatcher(store=object(), placement=placement, connect=False, **_kw(max_tokens_per_rank=4 * M))
    assert c._shared is a._shared and a.buffer is not first and first.destroyed  # re-created (one update only)
    assert a._shared.rdma_bytes == FakeNixlBuffer.get_rdma_size_hint(4 * M, HID, R, R * S)


# ---------------------------------------------------------------------------------------------- fake ranks

def _run_fake_ranks(make, steps, *, fp8=False, victim=None, kill_step=None, seed=0):
    """Run ``R`` ranks as threads over one fake world; returns per-rank results (see ``_fake_rank``)."""
    world = _World(R)
    _FakeEPCore.world = world
    placement = replicated_placement(L, E, R, S, seed=seed)
    out, errs = {}, []

    def body(rank):
        try:
            state = ElasticEPState(R, device="cpu")
            d = make(rank, state, placement)
            res = []
            for step in range(steps):
                if step == kill_step:
                    world.dead.add(victim)
                for layer in range(L):
                    sd = seed * 1000 + step * 10 + layer * 100 + rank
                    T = int(torch.randint(1, M + 1, (1,), generator=torch.Generator().manual_seed(sd)))
                    x, ids, w, _ = random_inputs(sd, T, HID, E, K, torch.bfloat16)
                    before = state.active_ranks.clone()
                    o = d.dispatch(x, ids, w, layer=layer)
                    y = run_local_experts(o.hidden_states, placement, layer, rank, o.hidden_states_scale,
                                          torch.bfloat16)
                    got = d.combine(y.to(torch.bfloat16), o.handle)
                    ref, routed = reference_layer(x, ids, w, placement, layer, before, rank * M, fp8=fp8)
                    assert torch.equal(o.topk_ids, routed.phys) and torch.equal(o.topk_weights, routed.weights)
                    wrong = ~(got == ref).all(1)
                    lost = torch.zeros(T, dtype=torch.bool)
                    if victim is not None and rank != victim:
                        lost = ((routed.phys >= 0) & (routed.phys // S == victim)).any(1) & (step == kill_step)
                    res.append(dict(step=step, wrong=int(wrong.sum()), wrong_ok=int((wrong & ~lost).sum()),
                                    lost=int(lost.sum()), live_dev=state.active_ranks.tolist(),
                                    live_host=state.live_ranks()))
            polled = d.poll_failures()
            out[rank] = dict(results=res, stats=d.stats.as_dict(), polled=polled, live=state.live_ranks(),
                             load=d.load.clone())
        except Exception:
            errs.append(traceback.format_exc())
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(R)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errs, errs[0]
    return out


def _make_nixl(fp8=False):
    def make(rank, state, placement):
        return nx.NixlEPDispatcher(store=object(), placement=placement, state=state, use_fp8=fp8,
                                   **_kw(rank=rank))
    return make


def _make_mooncake(fp8=False):
    from sglang_elastic.dispatch.mooncake_ep import MooncakeEPDispatcher

    def make(rank, state, placement):
        return MooncakeEPDispatcher(group=_Group(rank, R, S), placement=placement, state=state, use_fp8=fp8,
                                    **_kw(rank=rank))
    return make


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_nixl_matches_reference_with_fake_buffer(fake_nixl, fp8):
    res = _run_fake_ranks(_make_nixl(fp8), steps=2, fp8=fp8)
    for rank, r in res.items():
        assert all(s["wrong"] == 0 for s in r["results"]), (rank, r["results"])
        assert r["stats"]["lost_pairs"] == 0 and r["polled"] == []


def test_mooncake_matches_reference_with_fake_buffer(fake_mooncake):
    res = _run_fake_ranks(_make_mooncake(), steps=2)
    for rank, r in res.items():
        assert all(s["wrong"] == 0 for s in r["results"]), (rank, r["results"])


@pytest.mark.parametrize("make", [_make_nixl, _make_mooncake], ids=["nixl", "mooncake"])
def test_peer_death_is_masked_on_device_and_counted(fake_nixl, fake_mooncake, make):
    """Rank 1 dies at step 1: rank 0's step-1 tokens that had a pair there are renormalised over
    their other experts (counted as lost), active_ranks flips on the device without a host call,
    and from step 2 on every token is exact again (every expert has a replica on rank 0)."""
    res = _run_fake_ranks(make(), steps=4, victim=1, kill_step=1, seed=3)
    r = res[0]
    by = {s: [x for x in r["results"] if x["step"] == s] for s in range(4)}
    assert all(x["wrong"] == 0 for x in by[0])
    assert all(x["wrong_ok"] == 0 for x in by[1])
    lost = sum(x["lost"] for x in by[1])
    assert lost > 0 and r["stats"]["lost_pairs"] >= lost and r["stats"]["affected_tokens"] >= lost
    assert by[1][-1]["live_dev"] == [1, 0] and by[1][-1]["live_host"] == [0, 1]  # device first, host on poll
    for s in (2, 3):
        assert all(x["wrong"] == 0 for x in by[s]), by[s]
    assert r["polled"] == [1] and r["live"] == [0] and r["stats"]["peer_failures"] == 1


def test_known_death_reaches_nixl_ep_mask_before_any_call(fake_nixl):
    """nixl_ep reads its mask before each send and receive wait: a death the process knows of (the
    state's failed event, or the Liveness) is masked there at once, so no later call waits on it."""
    from sglang_elastic.transport.liveness import Liveness

    state = ElasticEPState(R, device="cpu")
    lv = Liveness()
    placement = Placement.trivial(L, E, R, S)
    d = nx.NixlEPDispatcher(store=object(), placement=placement, state=state, liveness=lv, **_kw(rank=0))
    d2 = nx.NixlEPDispatcher(store=object(), placement=placement, state=state, liveness=lv, **_kw(rank=0))
    buf = d.buffer
    assert d2.buffer is buf and buf.peers == {1} and buf.mask.tolist() == [0, 0]
    state.mark_failed([1], reason="membership: EOF")  # the membership watch's path
    assert buf.mask.tolist() == [0, 1]
    buf.update_mask_buffer(1, False)  # as a rejoin's connect_ranks would
    state.mark_joined([1])
    assert buf.mask.tolist() == [0, 0]
    lv.mark_dead(1, "membership: connection closed")  # the Liveness path: recorded in the state, masked
    assert buf.mask.tolist() == [0, 1] and not state.is_alive(1)
    assert state.active_ranks.tolist() == [1, 0]


def test_mooncake_liveness_death_clears_active_ranks(fake_mooncake):
    from sglang_elastic.dispatch.mooncake_ep import MooncakeEPDispatcher
    from sglang_elastic.transport.liveness import Liveness

    state = ElasticEPState(R, device="cpu")
    lv = Liveness()
    d = MooncakeEPDispatcher(group=_Group(0, R, S), placement=Placement.trivial(L, E, R, S), state=state,
                             liveness=lv, **_kw(rank=0))
    lv.mark_dead(1, "membership: connection closed")
    assert d.live_mask.tolist() == [1, 0]  # the tensor Mooncake EP's kernels read, cleared in place


def test_load_is_recorded_without_host_sync(fake_nixl):
    res = _run_fake_ranks(_make_nixl(), steps=1)
    for rank, r in res.items():
        want = torch.zeros(L, E, dtype=torch.int64)
        for layer in range(L):
            sd = layer * 100 + rank
            T = int(torch.randint(1, M + 1, (1,), generator=torch.Generator().manual_seed(sd)))
            _, ids, _, _ = random_inputs(sd, T, HID, E, K, torch.bfloat16)
            want[layer] += torch.bincount(ids[ids >= 0], minlength=E)
        assert torch.equal(r["load"], want)


# ---------------------------------------------------------------------------------------------- kernels

def _kernel_cases(device: str) -> List[dict]:
    """Triton routing / post-combine kernels vs the torch fallbacks on random cases (with dead ranks)."""
    out = []
    for case in range(8):
        g = torch.Generator().manual_seed(case)
        Rr, Ss = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        Ee = max(2, Rr * Ss - int(torch.randint(0, Ss, (1,), generator=g)))  # few replicas: dead ranks drop pairs
        Kk = int(torch.randint(1, min(Ee, 8) + 1, (1,), generator=g))
        T = 0 if case == 7 else int(torch.randint(1, 300, (1,), generator=g))
        perm = torch.randperm(Rr * Ss, generator=g)
        phy2log = torch.where(perm < Ee, perm, torch.randint(0, Ee, (Rr * Ss,), generator=g))
        placement = Placement(phy2log[None].repeat(2, 1), Rr, Ee)
        table = RoutingTable.from_placement(placement, device)
        live = (torch.rand(Rr, generator=g) > 0.3).to(torch.int32)
        live[(case + 2) % Rr] = 0
        live[case % Rr] = 1
        logits = torch.randn(T, Ee, generator=g)
        ids = logits.topk(Kk, dim=1).indices
        if T:
            ids[torch.rand(T, Kk, generator=g) < 0.05] = -1
        w = torch.rand(T, Kk, generator=g)
        res = {}
        for backend in ("torch", "triton"):
            # The GPU path's two launches (sglang_elastic.kernels), as GPUPathMixin makes them.
            cum = torch.zeros(4, dtype=torch.int64, device=device)
            acc = torch.zeros(3, dtype=torch.int64, device=device)
            load = torch.zeros(2, Ee, dtype=torch.int64, device=device)
            active = live.clone().to(device)
            routed, idx = KR.route_renormalize(ids.to(device), w.to(device), table.log2phy[1], active, Ss,
                                              (case % Rr) * max(T, 1), load[1], acc=acc, cum=cum,
                                              idx_dtype=torch.int32 if backend == "triton" else torch.int64,
                                              backend=backend)
            if backend == "triton":
                assert idx.dtype == torch.int32 and torch.equal(idx.long(), routed.phys)
            # A peer that "died" during the call: its pairs are lost, the token renormalised.
            mask = torch.zeros(Rr, dtype=torch.int32, device=device)
            mask[(case + 1) % Rr] = int(Rr > 1)
            connected = torch.ones(Rr, dtype=torch.int32, device=device)
            outv = (torch.randn(T, 64, generator=torch.Generator().manual_seed(case)) + 2).to(torch.bfloat16).to(device)
            KR.after_combine(outv, routed.phys, routed.weights, routed.affected, mask, True, Rr, Ss, cum, connected,
                            active, backend=backend)
            # The SGLang hook's launch (int32 ids in and out, -2 where no replica is live) and the
            # pre-routed after-combine that renormalises those pairs.
            hook = KR.map_mask_record(ids.to(torch.int32).to(device), table.log2phy[1], live.to(device), Ss,
                                      (case % Rr) * max(T, 1), None, out=torch.empty(T, Kk, dtype=torch.int32, device=device),
                                      dropped_id=-2, backend=backend)
            out2 = (torch.randn(T, 64, generator=torch.Generator().manual_seed(case)) + 2).to(torch.bfloat16).to(device)
            cum2 = torch.zeros(4, dtype=torch.int64, device=device)
            KR.after_combine(out2, hook, w.to(device), torch.zeros(T, dtype=torch.bool, device=device),
                             torch.zeros(Rr, dtype=torch.int32, device=device), True, Rr, Ss, cum2, dropped_id=-2,
                             backend=backend)
            res[backend] = dict(phys=routed.phys.cpu(), logical=routed.logical.cpu(), w=routed.weights.cpu(),
                                aff=routed.affected.cpu(), stats=routed.stats.cpu(), cum=cum.cpu(),
                                load=load.cpu(), out=outv.float().cpu(), live=active.cpu(), hook=hook.cpu(),
                                out2=out2.float().cpu(), cum2=cum2.cpu())
        ref = route(ids, w, RoutingTable.from_placement(placement), 1, live, token_offset=(case % Rr) * max(T, 1))
        a, b = res["torch"], res["triton"]
        checks = {
            # (on CUDA, torch sums a row in another order than on CPU: rescaled rows may differ by an ulp)
            "phys=ref": torch.equal(a["phys"], ref.phys),
            "weights=ref": torch.allclose(a["w"], ref.weights, rtol=1e-6, atol=0),
            "phys": torch.equal(a["phys"], b["phys"]), "logical": torch.equal(a["logical"], b["logical"]),
            "weights": torch.allclose(a["w"], b["w"], rtol=1e-6, atol=0)
            and torch.equal(a["w"][(a["phys"] >= 0).all(1)], b["w"][(a["phys"] >= 0).all(1)]),
            "affected": torch.equal(a["aff"], b["aff"]), "stats": torch.equal(a["stats"], b["stats"]),
            "cum": torch.equal(a["cum"], b["cum"]), "load": torch.equal(a["load"], b["load"]),
            "out": torch.allclose(a["out"], b["out"], rtol=1e-2, atol=0), "live": torch.equal(a["live"], b["live"]),
            "acc reset": not bool(acc.any()),
            "hook=ref": torch.equal(a["hook"].long(), torch.where((ids >= 0) & (ref.phys < 0), -2, ref.phys)),
            "hook": torch.equal(a["hook"], b["hook"]),
            "hook renorm": torch.allclose(a["out2"], b["out2"], rtol=1e-2, atol=0) and torch.equal(a["cum2"], b["cum2"])
            and int(a["cum2"][2]) == int((a["hook"] == -2).logical_and(w != 0).sum()),
        }
        out.append(dict(case=case, T=T, failed=[k for k, v in checks.items() if not v],
                        stats=b["cum"].tolist()))
    return out


def _interpreted_main() -> int:
    print(MARK + json.dumps(_kernel_cases("cpu")))
    return 0


HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_triton_kernels_match_torch_fallbacks_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, timeout=600,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stdout + proc.stderr:
        import numpy
        import triton

        if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
            pytest.skip(f"Triton {triton.__version__}'s interpreter passes scalars as 1-element arrays, which "
                        f"NumPy {numpy.__version__} refuses to convert (the compiled kernels are tested instead)")
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in json.loads(lines[-1][len(MARK):]):
        assert not r["failed"], r


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
def test_triton_kernels_match_torch_fallbacks_compiled():
    for r in _kernel_cases("cuda"):
        assert not r["failed"], r


# ---------------------------------------------------------------------------------------------- real nixl_ep

def _have_nixl_ep() -> bool:
    try:
        nx.import_nixl_ep()
        return True
    except ImportError:
        return False


GPU2 = CUDA and torch.cuda.device_count() >= 2


def _gpu_worker(rank: int, port: int, case: dict, out) -> None:
    try:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
        torch.cuda.set_device(0)
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=datetime.timedelta(seconds=120))
        Hh, Mm, Kk, Ee, Ss, Ll = 7168, 64, 8, 8, 8, 2
        placement = replicated_placement(Ll, Ee, R, Ss, seed=case["seed"])  # every expert on both ranks
        state = ElasticEPState(R, device="cuda")
        d = make_dispatcher("nixl", path="gpu", rank=rank, num_ranks=R, num_local_experts=Ss, hidden=Hh,
                            num_topk=Kk, max_tokens_per_rank=Mm, placement=placement, state=state, store=store,
                            use_fp8=case["fp8"], device="cuda", timeout_s=10.0)
        res = []
        for step in range(2):
            for layer in range(Ll):
                sd = case["seed"] * 1000 + step * 10 + layer * 100 + rank
                T = int(torch.randint(1, Mm + 1, (1,), generator=torch.Generator().manual_seed(sd)))
                x, ids, w, _ = random_inputs(sd, T, Hh, Ee, Kk, torch.bfloat16)
                x, ids, w = x.cuda(), ids.cuda(), w.cuda()
                o = d.dispatch(x, ids, w, layer=layer)
                hid = o.hidden_states if o.hidden_states_scale is None else \
                    layout.dequantize_fp8(o.hidden_states, o.hidden_states_scale, torch.bfloat16)
                a, b = expert_coeffs(layer, placement.phy2log[layer, rank * Ss:(rank + 1) * Ss].cuda(), torch.bfloat16)
                got = d.combine((hid * a[:, None, None] + b[:, None, None]).contiguous(), o.handle)
                ref, routed = reference_layer(x.cpu(), ids.cpu(), w.cpu(), placement, layer,
                                              torch.ones(R, dtype=torch.int32), rank * Mm, fp8=case["fp8"])
                err = (got.float().cpu() - ref.float()).abs()
                res.append(dict(max_abs=float(err.max()), rel=float(err.max() / ref.float().abs().max()),
                                exact=float((got.cpu() == ref).all(1).float().mean()),
                                routing=bool(torch.equal(o.topk_ids.cpu(), routed.phys))))
        d.poll_failures()
        out.put((rank, "ok", res, d.stats.as_dict()))
    except Exception:
        out.put((rank, "error", traceback.format_exc(), None))
    finally:  # flush the queue, then leave without nixl_ep's teardown
        out.close()
        out.join_thread()
        os._exit(0)


@pytest.mark.skipif(not (GPU2 and _have_nixl_ep()), reason="needs 2 GPUs and nixl_ep")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_nixl_ep_two_gpus_match_reference(fp8):
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gpu_worker, args=(r, port, dict(seed=5, fp8=fp8), q), daemon=True)
             for r in range(R)]
    for p in procs:
        p.start()
    res = {}
    try:
        deadline = time.monotonic() + 240
        while len(res) < R and time.monotonic() < deadline:
            try:
                rank, status, payload, stats = q.get(timeout=1)
            except queue.Empty:
                continue
            assert status == "ok", f"rank {rank}:\n{payload}"
            res[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        del store
    assert len(res) == R
    for rank, steps in res.items():
        for s in steps:
            assert s["routing"], (rank, s)
            # bf16: nixl_ep's combine sums in float32 like the reference, in its own order (one bf16
            # rounding apart); fp8: its own per-128 quantisation (x * 448 / amax; ours divides by
            # amax / 448, so ties can round the other way: one e4m3 step on a few elements).
            assert s["rel"] < (0.1 if fp8 else 8e-3), (rank, s)


if __name__ == "__main__":
    sys.exit(_interpreted_main())

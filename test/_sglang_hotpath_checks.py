"""SGLang-side checks of the hot path (issue 14), run with ``.venv-sglang/bin/python`` by test/test_sglang_hotpath.py.

    python test/_sglang_hotpath_checks.py WORKDIR

Real SGLang 0.5.23 code with our plugin loaded (``load_plugins``); the nixl GPU dispatcher runs on
CPU over a stand-in for ``nixl_ep.Buffer`` (this rank plus one well-behaved virtual peer). Prints
``CHECK <name> ok`` lines and exits 0, or raises.
"""
from __future__ import annotations

import collections
import os
import sys
import types
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

R, S, E, K, H, M, T = 2, 4, 6, 2, 128, 16, 12


def ok(name: str) -> None:
    print(f"CHECK {name} ok", flush=True)


class FakeNixlBuffer:
    """``nixl_ep.Buffer`` for rank 0 of 2: rank 0's experts get rows (the test runs them); the virtual
    peer's experts compute ``x * (slot + 1)`` themselves; a masked peer contributes nothing."""

    def __init__(self, rank=0, low_latency_mode=True, explicitly_destroy=False, tcp_store_group=None,
                 timeout_ms=0, **_):
        self.rank, self.peers, self.mask_calls = rank, set(), []

    @staticmethod
    def get_rdma_size_hint(M, H, R, num_experts):
        return 1

    def update_memory_buffers(self, num_ranks, num_experts_per_rank, num_rdma_bytes, **_):
        self.R, self.S = num_ranks, num_experts_per_rank
        self.mask = torch.zeros(num_ranks, dtype=torch.int32)

    def connect_ranks(self, ranks, activate=True):
        self.peers |= set(ranks)
        for r in ranks:
            self.mask[r] = 0

    def disconnect_ranks(self, ranks):
        self.peers -= set(ranks)

    def update_mask_buffer(self, rank, mask=False):
        self.mask[rank] = int(mask)
        self.mask_calls.append((rank, mask))

    def query_mask_buffer(self, out):
        out.copy_(self.mask)

    def dispatch(self, x, topk_idx, M, num_experts=None, use_fp8=False, async_finish=False, return_recv_hook=False):
        assert topk_idx.dtype == torch.int32 and not use_fp8
        S, Hh = self.S, x.shape[1]
        recv = torch.zeros(S, self.R * M, Hh, dtype=x.dtype)
        count = torch.zeros(S, dtype=torch.int32)
        where = []
        for e in range(S):
            toks = (topk_idx == e).any(1).nonzero().flatten()
            recv[e, :toks.numel()] = x[toks]
            count[e] = toks.numel()
            where.append(toks)
        src_info = torch.zeros(S, self.R * M, dtype=torch.int32)  # nixl_ep's handle[0]: [S, R * M]
        return recv, count, (src_info, where, x), None, None

    def combine(self, y, topk_idx, topk_weights, handle, async_finish=False, return_recv_hook=False, **_):
        _, where, x = handle
        out = torch.zeros(x.shape, dtype=torch.float32)
        for t in range(x.shape[0]):
            for k in range(topk_idx.shape[1]):
                p = int(topk_idx[t, k])
                if p < 0 or self.mask[p // self.S]:
                    continue
                if p < self.S:
                    row = y[p, (where[p] == t).nonzero().flatten()[0]].float()
                else:
                    row = x[t].float() * (p + 1)
                out[t] += topk_weights[t, k] * row
        return out.to(x.dtype), None, None


def reference(x, phys, w):
    """``sum_k w_k * x * (slot_k + 1)`` over routed pairs, weights renormalised over them (the rule's policy)."""
    kept = phys >= 0
    wk = torch.where(kept, w, torch.zeros_like(w))
    ksum = wk.sum(1, keepdim=True)
    scale = torch.where(ksum != 0, w.sum(1, keepdim=True) / torch.where(ksum != 0, ksum, 1.0), 0.0)  # none left: 0
    wk = torch.where((~kept & (w != 0)).any(1, keepdim=True), wk * scale, wk)
    return (wk.unsqueeze(-1) * (phys.clamp(min=0) + 1).float().unsqueeze(-1) * x.float().unsqueeze(1)).sum(1)


def main(workdir: str) -> None:
    import torch.distributed as dist
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang_elastic.sglang_plugin as plugin
    from sglang.srt.eplb import expert_location_dispatch as eld
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.layers.moe import topk as topk_mod
    from sglang.srt.layers.moe.token_dispatcher import NixlEPDispatcher
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLCombineInput
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.moe.utils import DeepEPMode

    import sglang_elastic.sglang_plugin.dispatcher as adapter
    from sglang_elastic.dispatch import nixl_ep as nx
    from sglang_elastic.dispatch._kernels import kernels
    from sglang_elastic.eplb.placement import Placement
    from sglang_elastic.sglang_plugin import context, routing_hook
    from sglang_elastic.state import ElasticEPStateManager as Ours

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _sglang_plugin_checks import metadata

    # ---- hooks: SGLang's top-k map step is ours (also where topk.py imported it by name)
    regs = plugin.registered_targets()
    for t in (routing_hook.TARGET, "sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo.init_new",
              "sglang.srt.eplb.expert_location.ExpertLocationMetadata.update"):
        assert t in regs, regs
    assert topk_mod.topk_ids_logical_to_physical is eld.topk_ids_logical_to_physical
    assert getattr(eld.topk_ids_logical_to_physical, "__wrapped__", None) is not None
    assert getattr(ExpertLocationDispatchInfo.init_new, "__wrapped__", None) is not None
    ok("hooks")

    # ---- the rule where SGLang maps: live replicas on the device, -2 for an expert with no live one
    Ours.reset()
    state = Ours.init(ep_size=R, device="cpu")
    # 8 slots on 2 ranks: experts 0 and 1 on both ranks, 2 and 3 on rank 0, 4 and 5 on rank 1 only.
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1, 4, 5], [1, 0, 3, 2, 1, 0, 5, 4]])
    meta = metadata(p2l, R, E)
    rt = routing_hook.routing(meta)
    table_ptr, live_ptr = rt.table.data_ptr(), rt.live.data_ptr()
    layer = 0
    info = ExpertLocationDispatchInfo("dynamic", None, meta.logical_to_all_physical_map[layer],
                                      meta.logical_to_all_physical_map_num_valid[layer], meta.num_physical_experts)
    routing_hook.tag_layer_after_init_new(info, ExpertLocationDispatchInfo, layer)
    g = torch.Generator().manual_seed(0)
    logical = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    logical[0] = torch.tensor([5, 0], dtype=torch.int32)  # expert 5 lives on rank 1 only
    logical[1] = torch.tensor([4, 5], dtype=torch.int32)  # a token whose experts all die with rank 1
    l2p = Placement(p2l, R, E).log2phy[layer]

    def want(live):
        ref = kernels.reference.map_mask_record_reference(logical, l2p, live, S, rt.token_offset)
        return torch.where((logical >= 0) & (ref < 0), torch.full_like(ref, -2), ref)

    phys = topk_mod.topk_ids_logical_to_physical(logical, info)
    assert phys.dtype == torch.int32 and torch.equal(phys.long(), want(state.active_ranks)), (phys, want(state.active_ranks))
    ok("rule at SGLang's map step")

    # ---- the adapter passes routed ids straight to the nixl GPU dispatcher: one routing launch a step
    fake = types.ModuleType("nixl_ep")
    fake.Buffer, fake.topk_idx_t = FakeNixlBuffer, torch.int32
    sys.modules["nixl_ep"] = fake
    nx._check_gpu_device = lambda device, what: None
    adapter._parallel_max_ep_size = lambda: R
    adapter._global_tcp_store = lambda: object()
    routing_hook.maps_layers = lambda: True  # SGLang's runtime (ep_dispatch_algorithm) is not published here
    os.environ["SGLANG_NIXL_EP_BF16_DISPATCH"] = "1"
    os.environ["SGLANG_NIXL_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"] = str(M)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    d = NixlEPDispatcher(group=dist.group.WORLD, router_topk=K, num_experts=R * S, num_local_experts=S,
                         hidden_size=H, params_dtype=torch.bfloat16, deepep_mode=DeepEPMode.LOW_LATENCY)
    assert isinstance(d, adapter.ElasticNixlEPDispatcher) and isinstance(d.inner, nx.NixlEPDispatcher)
    buf = d.inner.buffer
    calls = collections.Counter()
    for name in ("map_mask_record", "route_renormalize"):
        real = getattr(kernels, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        setattr(kernels, name, counted)

    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = torch.rand(T, K, generator=g)

    def step():
        ids = topk_mod.topk_ids_logical_to_physical(logical, info)
        out = d.dispatch(x, StandardTopKOutput(w, ids, torch.zeros(T, E)))
        scale = torch.arange(1, S + 1, dtype=torch.float32).view(S, 1, 1)
        y = (out.hidden_states.float() * scale).to(torch.bfloat16)
        return ids, d.combine(DeepEPLLCombineInput(y, out.topk_ids, out.topk_weights))

    ids, y = step()
    assert d.inner.ids_routed and calls == {"map_mask_record": 1}, calls
    assert torch.allclose(y.float(), reference(x, ids.long(), w), rtol=2e-2, atol=2e-2)
    ok("one routing launch per layer step (hook), adapter passes ids through")

    # ---- under torch.profiler: adapter dispatch + combine issue exactly the inner dispatcher's ops
    from torch.profiler import ProfilerActivity, profile

    def ops(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))

    topk_output = StandardTopKOutput(w, ids, torch.zeros(T, E))

    def via_adapter():
        out = d.dispatch(x, topk_output)
        d.combine(DeepEPLLCombineInput(out.hidden_states, out.topk_ids, out.topk_weights))

    def via_inner():
        out = d.inner.dispatch(x, ids, w, layer=0, check_inputs=False)
        d.inner.combine(out.hidden_states, out.handle)

    calls.clear()
    a, b = ops(via_adapter), ops(via_inner)
    assert a == b, (a - b, b - a)
    assert not calls, calls  # no routing launch in the dispatcher at all
    table_l = rt.layers[layer]
    h = ops(lambda: topk_mod.topk_ids_logical_to_physical(logical, info))
    k = ops(lambda: kernels.map_mask_record(logical, table_l, rt.live, S, rt.token_offset, None,
                                            out=torch.empty_like(logical), dropped_id=-2))
    assert h == k, (h - k, k - h)
    assert calls == {"map_mask_record": 2}, calls
    ok(f"profiler: adapter = inner dispatcher's ops ({sum(b.values())}), hook = one routing call ({sum(k.values())})")

    # ---- a death known to the process: device masks first, then every later step avoids the peer
    state.mark_failed([1], reason="membership: EOF")
    assert buf.mask.tolist() == [0, 1] and (1, True) in buf.mask_calls  # nixl_ep's mask, before any call
    assert state.active_ranks.tolist() == [1, 0]
    calls.clear()
    ids, y = step()
    assert calls == {"map_mask_record": 1}, calls
    assert torch.equal(ids.long(), want(state.active_ranks)) and int(ids[0, 0]) == -2
    assert bool(((ids < 0) | (ids < S)).all())  # nothing routed to the dead rank
    assert torch.allclose(y.float(), reference(x, ids.long(), w), rtol=2e-2, atol=2e-2)
    st = d.inner.stats
    assert st.dropped_pairs == int((ids == -2).sum()) and st.affected_tokens >= 1, st
    assert (rt.table.data_ptr(), rt.live.data_ptr()) == (table_ptr, live_ptr)  # no rebuild: graph-safe
    ok("death: nixl_ep mask at once, live replicas next step, -2 pairs renormalised and counted")

    # ---- degraded tokens: counted on the device per call, moved to the metric only when flushed
    from prometheus_client import CollectorRegistry

    from sglang_elastic.metrics import ElasticMetrics

    ctx = context.get()
    ctx._metrics = ElasticMetrics(CollectorRegistry())

    def degraded_metric() -> float:
        return ctx._metrics.registry.get_sample_value("sglang_elastic_degraded_tokens_total") or 0.0

    assert d in set(ctx.dispatchers)
    n = int((ids == -2).any(1).sum())
    assert n >= 1 and degraded_metric() == 0.0  # nothing fed per pass (no host sync in dispatch/combine)
    assert ctx.flush_degraded_tokens() == n and degraded_metric() == n
    assert ctx.flush_degraded_tokens() == 0 and degraded_metric() == n  # read-and-reset
    ids2, _ = step()  # one more degraded step: the updater below flushes it
    n2 = int((ids2 == -2).any(1).sum())
    ok(f"degraded tokens: {n} flushed on demand, none per pass")

    # ---- an update through the plugin's updater: the device tables hold the APPLIED placement when it
    # returns, before any later call: what a replayed CUDA graph (no Python) reads
    import numpy as np
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    from sglang_elastic.sglang_plugin.updater import ElasticExpertLocationUpdater, UpdateSummary

    state.mark_joined([1])
    set_global_expert_location_metadata(meta, allow_overwrite=True)
    applied_p2l = torch.tensor([[5, 1, 2, 3, 0, 1, 4, 0]])  # what the bridge applied to layer 0 (a repair)

    class AppliedBridge:
        """Our bridge with the weight movement done: it reports layer 0 applied differently from asked."""
        rank, live = 0, np.array([True, True])
        background, moving = False, ()  # a synchronous bridge: the move is done inside update()

        def update(self, weights, old_p2l, new_p2l, layer_ids, num_logical, rpn, background=False):
            assert not background
            return {}, {0: Placement(applied_p2l, R, E)}, UpdateSummary(layers=list(layer_ids))

    upd = ElasticExpertLocationUpdater()
    upd._bridge = AppliedBridge()
    version = ctx.placement_version
    assert upd.update({}, metadata(p2l, R, E), [0, 1], nnodes=1, rank=0) == {}
    assert ctx.placement_version == version + 1
    assert torch.equal(meta.physical_to_logical_map_cpu[0], applied_p2l[0])

    def replay(l2p_layer):
        """The launch a captured graph replays (the tables and the mask as they are now), against the rule."""
        out = torch.empty_like(logical)
        kernels.map_mask_record(logical, rt.layers[layer], rt.live, rt.slots_per_rank, rt.token_offset, None,
                                out=out, dropped_id=-2)
        ref = kernels.reference.map_mask_record_reference(logical, l2p_layer, state.active_ranks, S, rt.token_offset)
        return out, torch.where((logical >= 0) & (ref < 0), torch.full_like(ref, -2), ref)

    got, exp = replay(Placement(applied_p2l, R, E).log2phy[0])
    assert torch.equal(got, exp)
    assert not torch.equal(exp, replay(Placement(p2l[:1], R, E).log2phy[0])[1])  # the change is visible
    assert (rt.table.data_ptr(), rt.live.data_ptr()) == (table_ptr, live_ptr)
    assert degraded_metric() == n + n2  # the update flushed the step degraded before it
    ok("updater: applied placement in the device tables at once, degraded tokens flushed")

    # ---- SGLang installs a NEW metadata object (its scale path): a bump follows the object in force
    new_p2l = torch.tensor([[1, 0, 2, 3, 5, 1, 4, 0], [1, 0, 3, 2, 1, 0, 5, 4]])
    set_global_expert_location_metadata(metadata(new_p2l, R, E), allow_overwrite=True)
    ctx.bump_placement_version()
    got, exp = replay(Placement(new_p2l, R, E).log2phy[layer])
    assert torch.equal(got, exp) and rt.table.data_ptr() == table_ptr
    phys = topk_mod.topk_ids_logical_to_physical(logical, info)
    assert torch.equal(phys.long(), exp)
    set_global_expert_location_metadata(None, allow_overwrite=True)
    ok("new metadata object: tables follow it in place")


if __name__ == "__main__":
    main(sys.argv[1])

"""SGLang-side checks of the plugin, run with ``.venv-sglang/bin/python`` by test/test_sglang_plugin.py.

    python test/_sglang_plugin_checks.py inproc WORKDIR     # load_plugins, flags, names, EPLB, dispatcher
    python test/_sglang_plugin_checks.py gate                # unsupported version / SGLANG_PLUGINS: nothing patched
    python test/_sglang_plugin_checks.py updater WORKDIR     # 3 gloo ranks through SGLang's update entry point

Each prints ``CHECK <name> ok`` lines and exits 0, or raises (non-zero exit, traceback on stderr).
"""
from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

COMMAND = ["--tp", "4", "--enable-eplb", "--eplb-algorithm", "elasticity_aware", "--moe-a2a-backend", "nixl",
           "--deepep-mode", "low_latency", "--eplb-rebalance-layers-per-chunk", "1", "--elastic-ep-backend", "nixl"]
OURS = ["--eplb-balance-tolerance", "0.005", "--no-eplb-movement-aware", "--elastic-transfer-backend", "torch"]


def ok(name: str) -> None:
    print(f"CHECK {name} ok", flush=True)


def write_tiny_moe(workdir: str) -> str:
    """A config-only Qwen2-MoE checkpoint dir: 3 MoE layers x 16 experts (no weights are read).
    Written atomically: every rank process writes it while the others may be reading it."""
    path = os.path.join(workdir, "tiny-moe")
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"config.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64,
                   "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "num_experts": 16, "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 512,
                   "decoder_sparse_step": 1, "norm_topk_prob": False, "torch_dtype": "bfloat16"}, f)
    os.replace(tmp, os.path.join(path, "config.json"))
    return path


def metadata(p2l: torch.Tensor, num_ranks: int, num_logical: int):
    """An ExpertLocationMetadata for ``p2l`` built directly (no runtime context needed)."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    from sglang_elastic.eplb.placement import Placement

    pl = Placement(p2l, num_ranks, num_logical)
    P = p2l.shape[1]
    l2p = torch.full((p2l.shape[0], num_logical, P), -1, dtype=torch.int64)
    l2p[..., : pl.log2phy.shape[2]] = pl.log2phy
    return ExpertLocationMetadata(p2l.clone(), p2l.clone(), l2p, l2p.clone(), pl.logcnt, num_ranks, None)


# ---------------------------------------------------------------------------------------------- inproc
def check_inproc(workdir: str) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang_elastic.sglang_plugin as plugin

    # every hook in the list is queued here (the main process also gets the drain routes' hook)
    assert plugin.registered_targets() == [t for t, _, _ in plugin._hooks()], plugin.registered_targets()
    assert len(plugin.registered_targets()) == 15, plugin.registered_targets()
    assert len(set(plugin.registered_targets())) == 14, plugin.registered_targets()
    check_parse(workdir)
    check_names()
    check_warm_up(workdir)
    check_rebalance()
    check_init_by_eplb(workdir)
    check_dispatcher()


def check_parse(workdir: str) -> None:
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    model = write_tiny_moe(workdir)
    sa = prepare_server_args(["--model-path", model] + COMMAND + OURS)
    assert isinstance(sa, ServerArgs)
    assert (sa.eplb_algorithm, sa.moe_a2a_backend, sa.deepep_mode, sa.elastic_ep_backend) == (
        "elasticity_aware", "nixl", "low_latency", "nixl"), sa
    assert sa.enable_eplb and sa.eplb_rebalance_layers_per_chunk == 1
    assert os.environ["SGLANG_ELASTIC_EPLB_BALANCE_TOLERANCE"] == "0.005"
    assert os.environ["SGLANG_ELASTIC_EPLB_MOVEMENT_AWARE"] == "0"
    from sglang_elastic.sglang_plugin import options

    o = options.current()
    assert (o.eplb_balance_tolerance, o.eplb_movement_aware, o.elastic_transfer_backend) == (0.005, False, "torch")
    for k in list(os.environ):
        if k.startswith("SGLANG_ELASTIC_"):
            del os.environ[k]
    ok("parse")


def check_names() -> None:
    """Every module holding SGLang's names holds ours (REPLACE propagation), including late importers."""
    import importlib

    from sglang_elastic.sglang_plugin.dispatcher import ElasticMooncakeEPDispatcher, ElasticNixlEPDispatcher
    from sglang_elastic.sglang_plugin.state import SGLangElasticEPStateManager
    from sglang_elastic.sglang_plugin.updater import ElasticExpertLocationUpdater
    from sglang_elastic.state import ElasticEPStateManager as Ours

    want = {"NixlEPDispatcher": ElasticNixlEPDispatcher, "MooncakeEPDispatcher": ElasticMooncakeEPDispatcher,
            "ExpertLocationUpdater": ElasticExpertLocationUpdater,
            "ElasticEPStateManager": SGLangElasticEPStateManager}
    for mod in ("sglang.srt.layers.moe.token_dispatcher", "sglang.srt.layers.moe.token_dispatcher.nixl",
                "sglang.srt.layers.moe.token_dispatcher.mooncake", "sglang.srt.batch_overlap.two_batch_overlap",
                "sglang.srt.eplb.eplb_manager", "sglang.srt.eplb.expert_location_updater",
                "sglang.srt.elastic_ep.elastic_ep"):
        importlib.import_module(mod)
    seen = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("sglang.") or mod is None:
            continue
        for attr, cls in want.items():
            v = getattr(mod, attr, None)
            if v is not None and isinstance(v, type):
                assert v is cls, f"{name}.{attr} is {v}, not ours"
                seen += 1
    assert seen >= 10, seen
    assert issubclass(SGLangElasticEPStateManager, Ours)
    from sglang.srt.eplb.eplb_algorithms import elasticity_aware

    assert elasticity_aware.rebalance_experts.__wrapped__ is not None
    ok(f"names ({seen} bindings)")


def check_warm_up(workdir: str) -> None:
    """The AFTER hook on Scheduler.__init__ readies the EPLB kernels in a background thread where the
    published config may call our EPLB, and starts nothing where it may not."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args

    from sglang_elastic.eplb.algorithms import jit_kernels
    from sglang_elastic.sglang_plugin import context, eplb

    model = write_tiny_moe(workdir)
    base = ["--model-path", model, "--device", "cpu", "--skip-tokenizer-init"]
    publish(prepare_server_args(base), role="scheduler")  # SGLang's default EPLB: ours is never called
    assert not eplb.uses_our_eplb()
    eplb.warm_up_after_scheduler_init(None, object())
    assert context.get().eplb_warm_up is None, "warm-up started for a scheduler that never calls our EPLB"
    assert not jit_kernels._repair_refine_all.signatures, "kernels already loaded: the check would prove nothing"
    publish(prepare_server_args(base + ["--tp", "4", "--enable-eplb", "--eplb-algorithm", "elasticity_aware",
                                        "--moe-a2a-backend", "nixl", "--deepep-mode", "low_latency",
                                        "--ep-num-redundant-experts", "8"]), role="scheduler")
    assert eplb.uses_our_eplb()
    eplb.warm_up_after_scheduler_init(None, object())
    t = context.get().eplb_warm_up
    assert t is not None and t.daemon and t.name == "sglang-elastic-eplb-warm-up", t
    assert eplb.start_warm_up() is t  # once per process
    t.join(300)
    assert not t.is_alive()
    assert jit_kernels._repair_refine_all.signatures, "the warm-up thread ended without loading the kernels"
    ok("warm_up")


def check_rebalance() -> None:
    """SGLang's rebalance_experts(..., elasticity_aware) returns our placement; dead ranks are honoured."""
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb.eplb_algorithms import EplbAlgorithm, rebalance_experts

    from sglang_elastic.eplb.algorithms import rebalance
    from sglang_elastic.state import ElasticEPStateManager as Ours

    g = torch.Generator().manual_seed(0)
    load = torch.randint(1, 100, (2, 4, 16), generator=g).float()  # [steps, layers, experts]
    R, S = 8, 3
    Ours.reset()
    ElasticEPStateManager.init(ep_size=R, device="cpu")
    assert ElasticEPStateManager.instance() is Ours.instance()
    got = rebalance_experts(load, R * S, S, None, 1, EplbAlgorithm.elasticity_aware)
    want = rebalance(load.sum(0), R, S, algorithm="elasticity_aware").to_sglang()
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a, b)
    # Dead ranks marked on OUR manager are seen through SGLang's call.
    Ours.instance().mark_failed([2, 5], reason="test")
    p2l, l2p, cnt = rebalance_experts(load, R * S, S, None, 1, EplbAlgorithm.elasticity_aware)
    dead_slots = set(range(2 * S, 3 * S)) | set(range(5 * S, 6 * S))
    assert not (set(l2p[l2p >= 0].tolist()) & dead_slots), "a dead rank's slot is routable"
    assert int(cnt.sum()) == 4 * 6 * S, cnt.sum()
    want = rebalance(load.sum(0), R, S, live_ranks=Ours.instance().active_ranks_cpu.bool(), algorithm="elasticity_aware")
    assert torch.equal(p2l, want.to_sglang()[0])
    # The hierarchical variant keeps node spreading with dead ranks (upstream drops it).
    p2l_h, l2p_h, _ = rebalance_experts(load, R * S, S, None, 2, EplbAlgorithm.elasticity_aware_hierarchical)
    assert not (set(l2p_h[l2p_h >= 0].tolist()) & dead_slots)
    Ours.reset()
    ok("rebalance_experts")


def check_init_by_eplb(workdir: str) -> None:
    """ExpertLocationMetadata.init_by_eplb (published runtime, tiny model config) gives our placement,
    movement-aware against the placement in force, with our state's dead ranks left out."""
    import torch.distributed as dist
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb.expert_location import (ExpertLocationMetadata, get_global_expert_location_metadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args

    from sglang_elastic.eplb.algorithms import rebalance
    from sglang_elastic.eplb.placement import Placement
    from sglang_elastic.state import ElasticEPStateManager as Ours

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    model = write_tiny_moe(workdir)
    sa = prepare_server_args(["--model-path", model, "--tp", "4", "--enable-eplb", "--eplb-algorithm",
                              "elasticity_aware", "--moe-a2a-backend", "nixl", "--deepep-mode", "low_latency",
                              "--ep-num-redundant-experts", "8", "--device", "cpu", "--skip-tokenizer-init"])
    publish(sa, role="scheduler")
    mc = ModelConfig.from_server_args(sa)
    R, S, E, L = 4, 6, 16, 3
    Ours.reset()
    ElasticEPStateManager.init(ep_size=R, device="cpu")
    g = torch.Generator().manual_seed(1)
    count = torch.randint(1, 50, (L, E), generator=g)
    meta = ExpertLocationMetadata.init_by_eplb(mc, count)
    want = rebalance(count, R, S, algorithm="elasticity_aware")
    assert torch.equal(meta.physical_to_logical_map_cpu, want.to_sglang()[0])
    # With the first placement in force and rank 1 dead: movement-aware from it, rank 1 left out.
    set_global_expert_location_metadata(meta, allow_overwrite=True)
    Ours.instance().mark_failed(1, reason="test")
    count2 = count + torch.randint(0, 10, (L, E), generator=g)
    meta2 = ExpertLocationMetadata.init_by_eplb(mc, count2)
    live = Ours.instance().active_ranks_cpu.bool()
    cur = Placement.from_sglang(get_global_expert_location_metadata().physical_to_logical_map_cpu, R, E, live)
    want2 = rebalance(count2, R, S, live_ranks=live, current=cur.phy2log)
    assert torch.equal(meta2.physical_to_logical_map_cpu, want2.to_sglang()[0])
    assert not ((meta2.logical_to_all_physical_map_cpu // S == 1) & (meta2.logical_to_all_physical_map_cpu >= 0)).any()
    set_global_expert_location_metadata(None, allow_overwrite=True)
    Ours.reset()
    ok("init_by_eplb")


def check_dispatcher() -> None:
    """SGLang's NixlEPDispatcher name builds our adapter; argument mapping and the DeepEP-LL round trip."""
    import torch.distributed as dist
    from sglang.srt.layers.moe.token_dispatcher import MooncakeEPDispatcher, NixlEPDispatcher
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLCombineInput, DeepEPLLDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.moe.utils import DeepEPMode

    import sglang_elastic.sglang_plugin.dispatcher as adapter
    from sglang_elastic.dispatch import make_dispatcher

    calls = []

    def fake_inner(kind, path, **kw):  # the GPU kernels cannot run here: our torch dispatcher, one rank
        calls.append((kind, path, dict(kw)))
        kw.pop("store", None), kw.pop("group", None)
        return make_dispatcher("torch", path="host", store=dist.HashStore(), **kw)

    adapter.make_inner, real = fake_inner, adapter.make_inner
    os.environ["SGLANG_NIXL_EP_BF16_DISPATCH"] = "1"
    os.environ["SGLANG_NIXL_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"] = "16"
    try:
        H, S, K, T = 128, 4, 2, 5
        d = NixlEPDispatcher(group=dist.group.WORLD, router_topk=K, permute_fusion=True, num_experts=S,
                             num_local_experts=S, hidden_size=H, params_dtype=torch.float32,
                             deepep_mode=DeepEPMode.LOW_LATENCY, async_finish=True, return_recv_hook=True)
        assert isinstance(d, adapter.ElasticNixlEPDispatcher)
        kind, path, kw = calls[-1]
        assert (kind, path) == ("nixl", "gpu"), calls[-1]
        assert (kw["rank"], kw["num_ranks"], kw["num_local_experts"], kw["hidden"], kw["num_topk"],
                kw["max_tokens_per_rank"], kw["use_fp8"], kw["dtype"]) == (0, 1, S, H, K, 16, False, torch.float32), kw
        assert "store" in kw
        g = torch.Generator().manual_seed(2)
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
        w = torch.rand(T, K, generator=g)
        out = d.dispatch(x, StandardTopKOutput(w, ids, torch.zeros(T, S)))
        assert isinstance(out, DeepEPLLDispatchOutput) and out.format.name == "DEEPEP_LL"
        assert out.hidden_states.shape == (S, 16, H) and int(out.masked_m.sum()) == T * K
        scale = torch.arange(1, S + 1, dtype=torch.float32).view(S, 1, 1)
        y = d.combine(DeepEPLLCombineInput(out.hidden_states * scale, out.topk_ids, out.topk_weights))
        ref = (w.unsqueeze(-1) * (ids + 1).float().unsqueeze(-1) * x.unsqueeze(1)).sum(1)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5), (y - ref).abs().max()
        with_mode = None
        try:
            NixlEPDispatcher(group=dist.group.WORLD, router_topk=K, num_experts=S, num_local_experts=S,
                             hidden_size=H, params_dtype=torch.float32, deepep_mode=DeepEPMode.AUTO)
        except NotImplementedError as exc:
            with_mode = str(exc)
        assert with_mode and "low_latency" in with_mode
        m = MooncakeEPDispatcher(group=dist.group.WORLD, router_topk=K, num_experts=S, num_local_experts=S,
                                 hidden_size=H, params_dtype=torch.bfloat16, deepep_mode=DeepEPMode.LOW_LATENCY)
        assert isinstance(m, adapter.ElasticMooncakeEPDispatcher)
        kind, path, kw = calls[-1]
        assert (kind, path, kw["use_fp8"], kw["group"] is dist.group.WORLD) == ("mooncake", "gpu", True, True)
    finally:
        adapter.make_inner = real
    ok("dispatcher")


# ---------------------------------------------------------------------------------------------- gate
def check_gate() -> None:
    """SGLANG_PLUGINS without us, then an unsupported version: nothing is patched either time."""
    import logging

    import sglang.srt.plugins as plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    records = []

    class Keep(logging.Handler):
        def emit(self, r):
            records.append(r)

    logging.getLogger("sglang_elastic").addHandler(Keep())
    import sglang_elastic.sglang_plugin as plugin

    def untouched() -> None:
        from sglang.srt.eplb import expert_location_updater
        from sglang.srt.eplb.eplb_algorithms import elasticity_aware

        assert not plugin.registered_targets()
        assert not [t for t in HookRegistry._hooks if "sglang_elastic" in repr(HookRegistry._hooks[t])]
        assert elasticity_aware.rebalance_experts.__module__.startswith("sglang."), elasticity_aware.rebalance_experts
        assert expert_location_updater.ExpertLocationUpdater.__module__.startswith("sglang.")

    os.environ["SGLANG_PLUGINS"] = "some_other_plugin"
    plugins.load_plugins()
    untouched()
    ok("SGLANG_PLUGINS filter")

    del os.environ["SGLANG_PLUGINS"]
    plugins._plugins_loaded = False
    plugin.installed_sglang_version = lambda: "0.5.22"
    plugins.load_plugins()
    untouched()
    warns = [r for r in records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "0.5.22" in warns[0].getMessage(), [r.getMessage() for r in records]
    plugin.register()  # a second call stays silent
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1
    ok("version gate")


# ---------------------------------------------------------------------------------------------- updater
R, S, E, L, DEAD = 3, 3, 6, 2, 2
# Hand-made placement in force: layer 1's expert 5 lives only on rank 2 (an orphan when it dies);
# rank 2's other experts have replicas on live ranks (a dead source must not be chosen for them).
OLD = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 3, 5],
                    [0, 1, 2, 3, 4, 0, 5, 1, 3]])


def expert_weights(layer: int, e: int, i: int) -> torch.Tensor:
    """Expert ``e`` of ``layer``, tensor ``i``: values that identify it exactly."""
    shape = (2, 3) if i == 0 else (4,)
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1000 * layer + 10 * e + i / 4



def start_rank(rank: int, port: int, workdir: str, old: torch.Tensor, num_ranks: int, slots: int, experts: int):
    """One EP rank of a multi-process check, after ``load_plugins()``: the shared store, SGLang's server
    args and our state, this rank's expert weights of placement ``old`` ([L, R*S]) and its metadata.
    Returns ``(store, weights, model)``; ``weights[layer][i]`` is ``[S, ...]`` as SGLang holds them."""
    import datetime

    import torch.distributed as dist
    from sglang.srt.distributed.utils import set_global_tcp_store
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
    set_global_tcp_store(store)
    os.environ["SGLANG_ELASTIC_ELASTIC_TRANSFER_BACKEND"] = "torch"
    publish(prepare_server_args(["--model-path", write_tiny_moe(workdir), "--device", "cpu", "--skip-tokenizer-init"]),
            role="scheduler")
    ElasticEPStateManager.init(ep_size=num_ranks, device="cpu")
    weights = {l: [torch.stack([expert_weights(l, int(old[l, rank * slots + s]), i) for s in range(slots)])
                   for i in (0, 1)] for l in range(old.shape[0])}
    model = type("Model", (), {"routed_experts_weights_of_layer": weights})()
    set_global_expert_location_metadata(metadata(old, num_ranks, experts), allow_overwrite=True)
    return store, weights, model


def _rank_main(rank: int, port: int, workdir: str) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb import eplb_manager
    from sglang.srt.eplb.eplb_algorithms import EplbAlgorithm, rebalance_experts
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    from sglang_elastic.sglang_plugin.updater import ElasticExpertLocationUpdater

    store, weights, model = start_rank(rank, port, workdir, OLD, R, S, E)
    reloads = []

    def entry(new_meta) -> None:
        """SGLang's own entry point, with SGLang's own updater name (ours after load_plugins)."""
        updater = eplb_manager.ExpertLocationUpdater()
        assert isinstance(updater, ElasticExpertLocationUpdater)
        entry.updater = getattr(entry, "updater", updater)
        eplb_manager.update_expert_location_with_recovery(
            expert_location_updater=entry.updater, model=model, new_expert_location_metadata=new_meta,
            update_layer_ids=list(range(L)), tp_rank=rank, expert_backup_client=None,
            update_weights_from_disk_callable=lambda *a, **k: reloads.append((a, k)), ep_dispatch_algorithm="static",
            init_lplb_solvers_callable=lambda: None)

    # 1) all live: the placement in force again (builds our per-layer updaters, fills the backup store)
    entry(metadata(OLD, R, E))
    store.set(f"step1/{rank}", "done")
    if rank == DEAD:
        store.wait([f"step1/{r}" for r in range(R)])
        os._exit(0)  # a real process death: survivors' transport sees its sockets close
    store.wait([f"step1/{r}" for r in range(R)])
    # 2) rank 2 is dead: the kernels' way to say it (in place, then SGLang's snapshot/sync calls)
    st = ElasticEPStateManager.instance()
    st.active_ranks[DEAD] = 0
    st.snapshot_active_to_last()
    st.sync_active_to_cpu()
    load = torch.tensor([[[5, 1, 1, 9, 2, 7], [3, 8, 1, 1, 6, 4]]], dtype=torch.float32)
    p2l, _, _ = rebalance_experts(load, R * S, S, None, 1, EplbAlgorithm.elasticity_aware)
    assert (p2l.view(L, R, S)[:, :DEAD] >= 0).all()
    entry(metadata(p2l, R, E))
    meta = get_global_expert_location_metadata()
    assert torch.equal(meta.physical_to_logical_map_cpu, p2l)
    for l in range(L):
        for s in range(S):
            e = int(p2l[l, rank * S + s])
            for i in (0, 1):
                got = weights[l][i][s]
                assert torch.equal(got, expert_weights(l, e, i)), (rank, l, s, e, i, got)
    assert not reloads, reloads  # nothing reloaded from disk: live replicas and the backup store sufficed
    store.set(f"result/{rank}", json.dumps({"p2l": p2l.tolist()}))


def run_ranks(target, n: int, *args):
    """Run ``target(rank, port, *args)`` in ``n`` spawned processes around a fresh master store;
    assert they all exit 0 and return the store (for the results they wrote)."""
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, master.port, *args)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * n, f"rank exit codes {codes}"
    return master


def check_updater(workdir: str) -> None:
    master = run_ranks(_rank_main, R, workdir)
    res = [json.loads(master.get(f"result/{r}")) for r in range(R) if r != DEAD]
    assert res[0] == res[1]
    ok("updater (gloo, dead source, orphan from backup)")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "inproc":
        check_inproc(sys.argv[2])
    elif what == "gate":
        check_gate()
    elif what == "updater":
        check_updater(sys.argv[2])
    else:
        raise SystemExit(f"unknown check {what!r}")

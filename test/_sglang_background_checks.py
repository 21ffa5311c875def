"""SGLang-side check of the background bridge (run in .venv-sglang by test/test_sglang_plugin.py).

3 processes, real SGLang 0.5.23 modules on CPU: SGLang's ``EPLBManager.on_forward_pass_end`` (with
the plugin's AROUND hook applied by SGLang's HookRegistry) drives a 3-layer rebalance one layer per
forward pass through SGLang's ``update_expert_location_with_recovery`` and our updater (gloo). The
manager's generator is ``EPLBManager.rebalance``'s chunk loop (a ``yield`` before each chunk's
update), without the recorder and the algorithm. A store barrier per pass stands in for the token
exchange that keeps EP ranks' forward passes in lockstep. At every pass each rank checks that every
slot of its own the routing hook's table can route to holds the weights of the expert it routes to;
at the end the weights are bit-exact, the metadata and table equal the target, staging is freed.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from _sglang_plugin_checks import expert_weights, metadata, ok, run_ranks, start_rank

R, S, E, L = 3, 3, 6, 3
OLD = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2],
                    [0, 1, 2, 3, 4, 5, 3, 4, 5],
                    [0, 1, 2, 3, 4, 5, 0, 3, 5]])
NEW = OLD.roll(S, dims=1)  # every rank takes its left neighbour's experts: every slot moves remotely


def _rank_main(rank: int, port: int, workdir: str, background: bool) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.eplb import eplb_manager
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    from sglang_elastic.sglang_plugin import routing_hook

    os.environ["SGLANG_ELASTIC_ELASTIC_EPLB_BACKGROUND"] = "1" if background else "0"
    store, weights, model = start_rank(rank, port, workdir, OLD, R, S, E)
    table = routing_hook.routing()
    assert table is not None
    updater = eplb_manager.ExpertLocationUpdater()  # ours, through SGLang's name
    calls = []

    def chunk(new_meta, layers) -> None:
        calls.append(layers)
        eplb_manager.update_expert_location_with_recovery(
            expert_location_updater=updater, model=model, new_expert_location_metadata=new_meta,
            update_layer_ids=layers, tp_rank=rank, expert_backup_client=None,
            update_weights_from_disk_callable=lambda *a, **k: (_ for _ in ()).throw(AssertionError("disk reload")),
            ep_dispatch_algorithm="static", init_lplb_solvers_callable=lambda: None)

    def rebalance(new_meta):
        """EPLBManager.rebalance's chunk loop (0.5.23), then _entrypoint's counting of passes."""
        chunks = [[l] for l in range(L)]
        for c in chunks:
            if len(chunks) > 1:
                yield
            chunk(new_meta, c)
        while True:
            yield

    chunk(metadata(OLD, R, E), list(range(L)))  # builds our per-layer updaters and the backups (synchronous)
    mgr = eplb_manager.EPLBManager.__new__(eplb_manager.EPLBManager)
    mgr._main_generator = rebalance(metadata(NEW, R, E))

    def routable_slots_hold_their_experts() -> None:
        for l in range(L):
            for e in range(E):
                for slot in table.table[l, e].tolist():
                    if slot >= 0 and slot // S == rank:
                        for i in (0, 1):
                            assert torch.equal(weights[l][i][slot % S], expert_weights(l, e, i)), (rank, l, e, slot)

    bridge_pass = {}
    deadline = time.monotonic() + 120  # passes go on until every layer committed (a slow box: many passes)
    p = -1
    while time.monotonic() < deadline:
        p += 1
        n = len(calls)
        mgr.on_forward_pass_end()  # SGLang's method, our AROUND hook applied by SGLang's HookRegistry
        routable_slots_hold_their_experts()
        meta = get_global_expert_location_metadata()
        for l in range(L):
            if l not in bridge_pass and torch.equal(meta.physical_to_logical_map_cpu[l], NEW[l]):
                bridge_pass[l] = (p, len(calls) > n)  # the pass it committed at, and whether update() ran in it
        stop = len(bridge_pass) == L and len(calls) == L + 1 and not updater._bridge.moving
        store.add(f"pass/{p}", 1)  # the lockstep a forward pass's token exchange gives EP ranks
        while int(store.add(f"pass/{p}", 0)) < R and time.monotonic() < deadline + 30:
            time.sleep(0.001)
        if stop:
            break
    meta = get_global_expert_location_metadata()
    assert torch.equal(meta.physical_to_logical_map_cpu, NEW), meta.physical_to_logical_map_cpu
    assert torch.equal(table.table, routing_hook.SGLangRouting(metadata(NEW, R, E), table.live).table)
    for l in range(L):
        for s in range(S):
            for i in (0, 1):
                assert torch.equal(weights[l][i][s], expert_weights(l, int(NEW[l, rank * S + s]), i))
    for upd in updater._bridge.updaters.values():
        assert getattr(upd, "staging_bytes", lambda: 0)() == 0, "staging kept after the update"
    store.set(f"result/{rank}", json.dumps({"passes": {str(k): v for k, v in sorted(bridge_pass.items())}}))


def check(workdir: str, background: bool) -> None:
    master = run_ranks(_rank_main, R, workdir, background)
    res = [json.loads(master.get(f"result/{r}")) for r in range(R)]
    assert all(r == res[0] for r in res), res  # every rank committed each layer at the same pass
    passes = res[0]["passes"]
    print("commit passes (pass, update() ran in it):", passes, flush=True)
    if background:
        # a layer commits at a pass after the one whose update() started it; the last ones after
        # SGLang's last update(), through the hook
        assert all(passes[str(l)][0] > l + 1 for l in range(L)), passes  # layer l's update() runs at pass l + 1
        assert not passes[str(L - 1)][1], passes
    else:
        assert all(passes[str(l)] == [l + 1, True] for l in range(L)), passes  # inside its own update() call
    ok(f"background bridge ({'background' if background else 'synchronous'})")


if __name__ == "__main__":
    check(sys.argv[2], sys.argv[1] == "background")

"""Bytes and wall time of applying a rebalance with the layerwise ExpertLocationUpdater, 4 CPU ranks.

For DeepSeek-V3-like scenarios (58 layers, scaled down to 32 experts on 4 ranks x 12 slots, with
small expert tensors), each rebalance is applied twice in the same run, over the same transport:
(a) our movement-aware placement (``current=`` given) and (b) upstream SGLang 0.5.23's
``elasticity_aware`` placement (recomputed from scratch). Every rank checks afterwards that each
slot holds exactly its expert's weights.

    .venv/bin/python bench/bench_transfer.py [--transport torch|nixl|mooncake] [--expert-kb 128]

Scenarios: 1 dead rank (SIGKILLed after the backups are filled: orphans come from the backup store),
load drift 10 % and 30 %, scale-up 3 -> 4 ranks.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sglang_elastic.eplb import Placement, rebalance  # noqa: E402
from sglang_elastic.eplb.synthetic import drift, synthetic_load  # noqa: E402

L, E, R, S = 58, 32, 4, 12
VICTIM = 3
SCENARIOS = ("1 dead", "drift 10%", "drift 30%", "scale-up 3->4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_value(layer: int, expert: int, d: int) -> torch.Tensor:
    return torch.arange(d, dtype=torch.float32) * 1e-3 + float(layer * E + expert)


def placements(scenario: str, source: str):
    """``(before_live, after_live, current, target)`` for one scenario and placement source."""
    from _upstream import prepare_elasticity_aware

    w0 = synthetic_load("lognormal1", L, E, seed=0)
    before = np.ones(R, dtype=bool)
    after = np.ones(R, dtype=bool)
    load = w0
    if scenario == "1 dead":
        after[VICTIM] = False
    elif scenario.startswith("drift"):
        load = drift(w0, int(scenario.split()[1].rstrip("%")) / 100, seed=1)
    elif scenario.startswith("scale-up"):
        before[VICTIM] = False

    def plan(load_, live, current):
        if source == "ours":
            return rebalance(load_, R, S, live_ranks=live, current=current)
        call, convert = prepare_elasticity_aware(load_, R, S, live_ranks=live)
        return convert(call())

    current = plan(w0, before, None)
    target = plan(load, after, current)
    return before, after, current, target


def worker(kind, rank, port, scenario, source, d, out):
    try:
        from sglang_elastic.location.updater import ExpertLocationUpdater, StoreVote
        from sglang_elastic.transport import make_transport

        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=datetime.timedelta(seconds=60))
        before, after, current, target = placements(scenario, source)
        if not before[rank]:  # a rank that joins: waits until the others are ready, starts empty
            current = Placement(current.phy2log, R, E)
        live_now = np.flatnonzero(before).tolist() if before[rank] else []
        t = make_transport(kind, rank, store)
        w = torch.full((L, S, d), float("nan"))
        for l in range(L):
            for s in range(S):
                e = int(current.phy2log[l, rank * S + s])
                if e >= 0:
                    w[l, s] = expert_value(l, e, d)
        vote_timeout = 30.0
        if scenario.startswith("scale-up"):
            # The joining rank takes part from the start of the update: everyone moves to 4 ranks.
            t.set_peers(list(range(R)))
            upd = ExpertLocationUpdater(rank, t, {"w": w}, current, live_ranks=np.ones(R, dtype=bool),
                                        layers_per_chunk=1, backup=False,
                                        vote=StoreVote(store, rank, vote_timeout, prefix=f"b/{scenario}/{source}"))
        else:
            t.set_peers(live_now)
            upd = ExpertLocationUpdater(rank, t, {"w": w}, current, live_ranks=before, layers_per_chunk=1,
                                        vote=StoreVote(store, rank, vote_timeout, prefix=f"b/{scenario}/{source}"))
            upd.fill_backup()
        backup_mb = upd.backup_bytes() / 2**20
        if scenario == "1 dead":
            store.set(f"filled/{rank}", "1")
            if rank == VICTIM:
                os.kill(os.getpid(), signal.SIGKILL)
            store.wait([f"filled/{r}" for r in range(R)])
            time.sleep(0.5)  # let the victim die for real before anyone notices
            upd.set_live(after)  # membership's verdict: drop its slots, re-home its backups
        store.set(f"ready/{scenario}/{source}/{rank}", "1")
        store.wait([f"ready/{scenario}/{source}/{r}" for r in np.flatnonzero(after)])
        t0 = time.perf_counter()
        reports = upd.update(target)
        wall = time.perf_counter() - t0
        bad = 0
        for l in range(L):
            for s in range(S):
                e = int(upd.placement.phy2log[l, rank * S + s])
                if e >= 0 and not torch.equal(w[l, s], expert_value(l, e, d)):
                    bad += 1
        moved = sum(r.bytes_moved for r in reports)
        remote = sum(r.copies_remote for r in reports)
        restored = sum(r.restored for r in reports)
        out.put((rank, "ok", dict(wall=wall, bytes=moved, remote=remote, restored=restored, bad=bad,
                                  chunks=len(reports), backup_mb=backup_mb)))
        t.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc()))


def run(kind: str, scenario: str, source: str, d: int):
    ctx = mp.get_context("spawn")
    port = _free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=60))
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, r, port, scenario, source, d, out)) for r in range(R)]
    for p in procs:
        p.start()
    try:
        res = {}
        expect = R - (1 if scenario == "1 dead" else 0)
        while len(res) < expect:
            rank, status, payload = out.get(timeout=300)
            if status != "ok":
                raise RuntimeError(f"rank {rank}: {payload}")
            res[rank] = payload
        return res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        del master


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="torch", choices=["torch", "nixl", "mooncake"])
    ap.add_argument("--expert-kb", type=int, default=128, help="size of one scaled-down expert (default 128 KB)")
    args = ap.parse_args(argv)
    d = args.expert_kb * 1024 // 4
    print(f"# Layerwise transfer: {L} layers, {E} experts, {R} ranks x {S} slots, {args.expert_kb} KB per expert, "
          f"transport {args.transport}, 1 layer per chunk; machine: {os.cpu_count()} CPUs")
    print()
    print("| scenario | placement | experts moved | restored from backup | MB moved | wall s (slowest rank) | "
          "chunks | wrong slots | backup MB/rank | ratio ours/upstream (bytes, time) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scen in SCENARIOS:
        rows = {}
        for source in ("ours", "upstream"):
            res = run(args.transport, scen, source, d)
            any_r = next(iter(res.values()))
            rows[source] = dict(moved=any_r["remote"], restored=any_r["restored"], mb=any_r["bytes"] / 2**20,
                                wall=max(r["wall"] for r in res.values()), chunks=any_r["chunks"],
                                bad=sum(r["bad"] for r in res.values()),
                                backup=max(r["backup_mb"] for r in res.values()))
        for source in ("ours", "upstream"):
            r = rows[source]
            ratio = ""
            if source == "ours":
                u = rows["upstream"]
                rb = r["mb"] / u["mb"] if u["mb"] else float("nan")
                rt = r["wall"] / u["wall"] if u["wall"] else float("nan")
                ratio = f"{rb:.3f}, {rt:.2f}"
            print(f"| {scen} | {source} | {r['moved']} | {r['restored']} | {r['mb']:.1f} | {r['wall']:.2f} | "
                  f"{r['chunks']} | {r['bad']} | {r['backup']:.1f} | {ratio} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-stall rebalancing: the pause a forward pass pays per step during a rebalance, ours vs synchronous.

Runs R CPU processes on 127.0.0.1 (torch transport, store votes, membership liveness). Each step is a
forward pass stand-in (every rank multiplies its tokens through each local expert of every layer,
then a store barrier stands for the token exchange) followed by the updater's ``step()``. In the same
run, the same rebalance (p0 -> p1, ``--layers-per-chunk`` layers per chunk) is applied by

* ``sync``: the synchronous updater (``BackgroundUpdater(background=False)``, i.e. the existing
  :class:`~sglang_elastic.location.updater.ExpertLocationUpdater`: each step moves and commits a chunk);
* ``background``: ours (chunks move on the transport thread; a step pays only the commit, at a quiet
  boundary: the updater's threads start nothing during it);
* ``kept``: ours with ``keep_slots=True`` (the target reordered within each rank so experts a rank holds
  stay in their slot: the commit copies only experts that arrive).

Printed per mode: steady-state step time, step time during the rebalance, the update pause per step
(max and mean over steps of the max over ranks), steps the rebalance took, bytes moved and staging.

    .venv/bin/python bench/bench_zero_stall.py [--layers 8 --experts 32 --slots 12 --hidden 256]

``--pauses OUT.json ...`` instead summarises rehearsal runs (``sglang-elastic rehearse --json OUT.json``):
max / p50 / mean over the steps with an update of ``steps[i].update_pause_max``, and the wrong outputs.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import socket
import sys
import time
import traceback

import numpy as np
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _barrier(store, lv, tag: str, rank: int, live) -> None:
    store.set(f"{tag}/{rank}", "1")
    keys = [f"{tag}/{r}" for r in live]
    while not store.check(keys):
        lv.check(live, what=tag)
        time.sleep(0.0002)


def _worker(rank: int, a, port: int, mport: int, out) -> None:
    try:
        torch.set_num_threads(1)
        from sglang_elastic.eplb import rebalance
        from sglang_elastic.eplb.synthetic import drift, synthetic_load
        from sglang_elastic.location.background import BackgroundUpdater
        from sglang_elastic.membership import MembershipClient, StoreVote
        from sglang_elastic.transport import Liveness, make_transport

        R, L, E, S, H = a.ranks, a.layers, a.experts, a.slots, a.hidden
        lv = Liveness()
        member = MembershipClient("127.0.0.1", mport, rank, liveness=lv)
        member.join()
        member.wait_for_epoch(lambda v: len(v.live) == R, timeout=120)
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
        transport = make_transport("torch", rank, store, liveness=lv)
        transport.set_peers(list(range(R)))
        w0 = synthetic_load("lognormal1", L, E, seed=0)
        p0 = rebalance(w0, R, S)
        p1 = rebalance(drift(w0, 0.6, seed=1), R, S, current=p0, balance_tolerance=0.0)
        gen = torch.Generator().manual_seed(0)
        experts = torch.randn(L, E, 2, H, H, generator=gen) * 0.05  # (w1, w2) of each expert
        w = torch.empty(L, S, 2, H, H)
        x = torch.randn(a.tokens, H, generator=gen)
        live = list(range(R))
        rows = []
        for mode in ("sync", "background", "kept") * 2:
            for l in range(L):  # every run starts from p0
                w[l] = experts[l, p0.phy2log[l, rank * S:(rank + 1) * S]]
            tag = f"{mode}{len(rows)}"
            upd = BackgroundUpdater(rank, transport, {"w": w}, p0, timeout_s=60, liveness=lv,
                                    vote=StoreVote(store, rank, 60, prefix=f"vote/{tag}"), store=store,
                                    background=(mode != "sync"), prefix=f"ready/{tag}",
                                    layers_per_chunk=a.layers_per_chunk, keep_slots=(mode == "kept"))
            upd.fill_backup()
            steps = []
            began = None
            for step in range(a.steady + 4 * L):
                t0 = time.perf_counter()
                h = x
                for l in range(L):  # the forward pass on the placement in force
                    h = h + sum(torch.relu(h @ w[l, s, 0]) @ w[l, s, 1] for s in range(S)) / S
                _barrier(store, lv, f"pass/{tag}/{step}", rank, live)
                if step == a.steady:
                    upd.begin(p1)
                    began = step
                t1 = time.perf_counter()
                moved, active = 0, began is not None and not upd.done
                if active:
                    rep = upd.step()
                    moved = rep.bytes_moved if rep is not None else 0
                pause = time.perf_counter() - t1
                steps.append((time.perf_counter() - t0, pause, active, moved))
                if began is not None and upd.done:
                    break
            done = upd.placement.phy2log
            assert (done.reshape(L, R, S).sort(-1).values == p1.phy2log.reshape(L, R, S).sort(-1).values).all()
            for l in range(L):
                want = experts[l, done[l, rank * S:(rank + 1) * S]]
                assert torch.equal(w[l], want), f"rank {rank} layer {l}: weights differ from the target's"
            rows.append(dict(mode=mode, steps=steps, steady=a.steady, peak=getattr(upd, "staging_peak", 0),
                             sync_staging=a.layers_per_chunk * S * 2 * H * H * 4, began=began))
            upd.close()
            _barrier(store, lv, f"end/{tag}", rank, live)
        out.put((rank, "ok", rows))
        member.close()
    except Exception:  # noqa: BLE001 - reported to the parent, which prints it
        out.put((rank, "error", traceback.format_exc()))


def pauses(paths) -> int:
    """Print the update pause figures of rehearsal JSON files (one line each)."""
    import json

    if not paths:
        print("bench_zero_stall: --pauses needs rehearsal JSON files (sglang-elastic rehearse --json OUT.json)", file=sys.stderr)
        return 2
    for path in paths:
        try:
            with open(path) as f:
                steps = json.load(f)["steps"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench_zero_stall: cannot read rehearsal JSON {path}: {exc}", file=sys.stderr)
            return 2
        p = np.array([s["update_pause_max"] for s in steps if s["update_pause_max"] > 0]) * 1e3
        worst = max(steps, key=lambda s: s["update_pause_max"])
        print(f"{path}: steps with an update {len(p)}, pause max {p.max():.2f} ms (step {worst['step']}, "
              f"{worst['phase']}), p50 {np.median(p):.2f} ms, mean {p.mean():.2f} ms, "
              f"wrong {sum(s['mismatches'] for s in steps)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--pauses"]:
        return pauses(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--slots", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers-per-chunk", type=int, default=1)
    ap.add_argument("--steady", type=int, default=5)
    a = ap.parse_args(argv)
    for k in ("ranks", "layers", "experts", "slots", "hidden", "tokens", "layers_per_chunk", "steady"):
        if getattr(a, k) < 1:
            print(f"bench_zero_stall: --{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}", file=sys.stderr)
            return 2
    from sglang_elastic.membership import MembershipServer

    ctx = mp.get_context("spawn")
    port = _free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=60))
    srv = MembershipServer("127.0.0.1", 0, world_size=a.ranks)
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, a, port, srv.port, q)) for r in range(a.ranks)]
    for p in procs:
        p.start()
    try:
        res = {}
        while len(res) < a.ranks:
            rank, status, payload = q.get(timeout=600)
            if status != "ok":
                print(f"rank {rank} failed:\n{payload}", file=sys.stderr)
                return 1
            res[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        srv.close()
        del master
    per_expert = 2 * a.hidden * a.hidden * 4
    print(f"# {a.ranks} ranks x {a.slots} slots, {a.layers} layers x {a.experts} experts, expert {per_expert / 1e6:.2f} MB, "
          f"{a.layers_per_chunk} layer(s)/chunk, torch transport, CPU; pause/step = max over ranks per step")
    print(f"{'mode':<11}{'steady step ms':>15}{'rebal step ms':>14}{'rebal step max':>15}{'pause max ms':>13}"
          f"{'pause mean ms':>14}{'pause p50 ms':>13}{'steps':>6}{'MB moved':>9}{'staging MB':>11}")
    for i, row in enumerate(res[0]):
        n = len(row["steps"])
        step = np.array([[res[r][i]["steps"][k][0] for r in res] for k in range(n)]).max(1)
        pause = np.array([[res[r][i]["steps"][k][1] for r in res] for k in range(n)]).max(1)
        active = np.array([any(res[r][i]["steps"][k][2] for r in res) for k in range(n)])
        moved = sum(res[r][i]["steps"][k][3] for r in res for k in range(n))
        steady = step[: row["steady"]]
        reb = step[active]
        staging = row["peak"] if row["mode"] != "sync" else row["sync_staging"]
        print(f"{row['mode']:<11}{1e3 * steady[1:].mean():>15.2f}{1e3 * reb.mean():>14.2f}{1e3 * reb.max():>15.2f}"
              f"{1e3 * pause[active].max():>13.2f}{1e3 * pause[active].mean():>14.2f}{1e3 * np.median(pause[active]):>13.2f}"
              f"{int(active.sum()):>6}"
              f"{moved / 1e6:>9.1f}{staging / 1e6:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

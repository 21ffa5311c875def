"""Layerwise expert transfer over NVLink between 2 GPUs: ExpertLocationUpdater on the nixl (VRAM) and
torch (NCCL) transports, against a plain GPU0 -> GPU1 ``tensor.copy_`` of the same size.

    python3 bench/bench_transfer_gpu.py --out $OUT/transfer.json       # 2 GPUs (one process per GPU)
    python3 bench/bench_transfer_gpu.py --diag --out $OUT/transfer.json   # + step breakdown, raw wire, pull copy
    .venv/bin/python bench/bench_transfer_gpu.py --smoke [--diag]      # CPU: tiny experts, checks it runs

On the lent 2 x H200 machine: install the nixl wheels (``nixl-cu13==1.4.0`` + ``nixl==1.4.0``) with
``pip install --no-index --no-deps --target $HOME/site .whl/*.whl``, ``PYTHONPATH=$HOME/site:$PWD``,
and keep ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1`` (set here too).

Experts are DeepSeek-V3-sized fp8 experts stored as uint8: ``w13`` [4096, 7168] + ``w2`` [7168, 2048]
= 3 x 7168 x 2048 = 44,040,192 bytes per expert. Each rank holds ``--slots-per-rank`` (8) slots in
each of ``--layers`` (4) layers. Two placement changes, each applied forward and back, alternating:

* ``swap``: 16 experts; rank 0 gives ``--move`` (4) experts per layer to rank 1 and takes 4 of rank
  1's: 2 x 4 experts per layer cross NVLink, 4 in each direction;
* ``oneway``: 12 experts; rank 1 replaces 4 replicas by 4 experts only rank 0 holds: 4 experts per
  layer go GPU0 -> GPU1, nothing comes back.

Each change is applied with ``layers_per_chunk`` = each of ``--chunks`` (1 and 4 layers):
``updater.step()`` moves and commits one chunk. Both ranks enter every ``step()`` together (a store
barrier); the table gives, per configuration, medians over every timed step of the slowest rank:

* ``step ms``: wall time of ``updater.step()`` (plus a device synchronize): the pause one chunk adds
  to serving (plan + transport execute + vote + staging -> weights copy + commit);
* ``exec ms``: the transport's ``execute`` alone; ``vote ms``: the StoreVote round;
* ``GB/s``: ``ChunkReport.bytes_moved`` (all cross-rank bytes, both directions) / step wall time, and
  the same over exec time;
* ``copy GB/s``: a plain ``dst.copy_(src)`` cuda:0 -> cuda:1 of the chunk's bytes (CUDA events, median),
  measured in the same run before the workers start; ``bidir GB/s``: two copies of half the bytes
  each, 0 -> 1 and 1 -> 0 at once (wall clock). ``%copy`` / ``%bidir`` are GB/s over them.

Exactness: after every step (outside the timed region) each slot of the chunk's layers is compared
byte for byte with its expert's expected contents (pseudo-random bytes from an integer hash of
layer, expert and tensor: identical on every device), and every slot of every layer is compared at the end of each configuration. The backup
store (host memory) is off for the timed rows; ``--backup-repeats`` adds a separately reported
``swap`` row with it on (its host-memory re-homing after each commit is part of that step).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

R = 2
NAMES = ("w13", "w2")


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny experts, few repeats (checks it runs)")
    ap.add_argument("--transports", default="nixl,torch")
    ap.add_argument("--scenarios", default="swap,oneway")
    ap.add_argument("--chunks", default="1,4", help="layers per chunk, comma-separated")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slots-per-rank", type=int, default=8)
    ap.add_argument("--move", type=int, default=4, help="experts per layer that change slot (per direction)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048, help="MoE intermediate size (w13 is [2*inter, hidden])")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates per configuration")
    ap.add_argument("--repeats", type=int, default=10, help="timed updates per configuration (alternating A<->B)")
    ap.add_argument("--backup-repeats", type=int, default=2, help="timed updates of the backup row (0: skip it)")
    ap.add_argument("--ref-reps", type=int, default=30)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="updater / transport timeout")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="give up on a transport's workers after this")
    ap.add_argument("--diag", action="store_true",
                    help="also: plan time per step, the raw wire (the transport's own NIXL reads / NCCL group "
                         "without the protocol around it) for the largest chunk, and a pull copy (cupy)")
    ap.add_argument("--out", help="write all numbers as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.inter = 64, 16
        args.warmup, args.repeats, args.backup_repeats, args.ref_reps = 1, 2, 1, 2
        if "nixl" in args.transports and not _has_nixl():
            args.transports = ",".join(t for t in args.transports.split(",") if t != "nixl")
    args.transports = [t for t in args.transports.split(",") if t]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    if 2 * args.move > args.slots_per_rank:
        ap.error("--move must be at most half of --slots-per-rank")
    return args


def _has_nixl() -> bool:
    try:
        from nixl._api import nixl_agent  # noqa: F401
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ model

def shapes(args) -> Dict[str, Tuple[int, ...]]:
    return {"w13": (2 * args.inter, args.hidden), "w2": (args.hidden, args.inter)}


def bytes_per_expert(args) -> int:
    return sum(math.prod(s) for s in shapes(args).values())


def placements(scenario: str, L: int, S: int, m: int):
    """``(A, B)``: two placements over 2 ranks of S slots; A -> B and B -> A move m experts per layer
    and direction (swap) or m experts per layer from rank 0 to rank 1 (oneway)."""
    from sglang_elastic.eplb import Placement

    if scenario == "swap":
        E = 2 * S
        a = list(range(2 * S))
        b0 = list(range(S, S + m)) + list(range(m, S))
        b1 = list(range(m)) + list(range(S + m, 2 * S))
        b = b0 + b1
    elif scenario == "oneway":
        E = S + m
        r0 = list(range(S))
        a = r0 + list(range(S, S + m)) + list(range(m, S))
        b = r0 + list(range(S, S + m)) + list(range(m)) + list(range(2 * m, S))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    pa = Placement(torch.tensor([a] * L), R, E).validate()
    pb = Placement(torch.tensor([b] * L), R, E).validate()
    return pa, pb


def pattern(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """Pseudo-random bytes from an integer hash of (index, seed): the same bytes on any device."""
    x = torch.arange(numel, dtype=torch.int64, device=device)
    x = ((x + seed) * 0x2545F491) & 0xFFFFFFFF  # factors < 2**31: products stay inside int64
    x ^= x >> 15
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    x ^= x >> 13
    return ((x >> 8) & 0xFF).to(torch.uint8)


class Expected:
    """Pseudo-random bytes of (layer, expert, tensor), generated on the device and cached."""

    def __init__(self, args, device: torch.device) -> None:
        self.shapes, self.device, self.cache = shapes(args), device, {}

    def get(self, layer: int, expert: int, name: str) -> torch.Tensor:
        key = (layer, expert, name)
        t = self.cache.get(key)
        if t is None:
            seed = 1_000_003 * (layer + 1) + 1009 * (expert + 1) + 7 * NAMES.index(name)
            t = pattern(math.prod(self.shapes[name]), seed, self.device).view(self.shapes[name])
            self.cache[key] = t
        return t


# ------------------------------------------------------------------------------------------ reference copy

def _pull_copy(dst: torch.Tensor, src: torch.Tensor, n: int, reps: int) -> Optional[float]:
    """cudaMemcpyPeerAsync issued on the destination device's stream (a pull, as UCX cuda_ipc's GET
    does), through cupy; median seconds, or None without cupy."""
    try:
        import cupy
    except Exception:
        return None
    times = []
    with cupy.cuda.Device(dst.device.index):
        st = cupy.cuda.Stream(non_blocking=True)
        for i in range(reps + 1):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record(st)
            cupy.cuda.runtime.memcpyPeerAsync(dst.data_ptr(), dst.device.index, src.data_ptr(), src.device.index, n,
                                              st.ptr)
            e1.record(st)
            e1.synchronize()
            if i:
                times.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
    return statistics.median(times)


def reference_copies(sizes: List[int], reps: int, pull: bool = False) -> Dict[int, dict]:
    """Plain cuda:0 -> cuda:1 (and 1 -> 0, and both at once) copies of each size; GB/s medians."""
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    out: Dict[int, dict] = {}
    big = max(sizes)
    a0 = torch.randint(0, 256, (big,), dtype=torch.uint8, device=d0)
    a1 = torch.randint(0, 256, (big,), dtype=torch.uint8, device=d1)
    b0 = torch.empty(big, dtype=torch.uint8, device=d0)
    b1 = torch.empty(big, dtype=torch.uint8, device=d1)
    s0, s1 = torch.cuda.Stream(d0), torch.cuda.Stream(d1)

    def sync():
        torch.cuda.synchronize(d0)
        torch.cuda.synchronize(d1)

    def uni(src, dst, dev, n):
        dst[:n].copy_(src[:n])
        sync()
        times = []
        for _ in range(reps):
            st = torch.cuda.current_stream(dev)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(st)
            dst[:n].copy_(src[:n])  # cross-device copy: runs on the source device's current stream
            e1.record(st)
            sync()
            times.append(e0.elapsed_time(e1) / 1e3)
        ok = torch.equal(dst[:n].to(src.device), src[:n])
        return statistics.median(times), ok

    for n in sizes:
        t01, ok01 = uni(a0, b1, d0, n)
        t10, ok10 = uni(a1, b0, d1, n)
        h = n // 2
        times = []
        for i in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            with torch.cuda.stream(s0):
                b1[:h].copy_(a0[:h])
            with torch.cuda.stream(s1):
                b0[:n - h].copy_(a1[:n - h])
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        tb = statistics.median(times)
        out[n] = dict(bytes=n, t01_s=t01, gbs_01=n / t01 / 1e9, t10_s=t10, gbs_10=n / t10 / 1e9,
                      tbidir_s=tb, gbs_bidir=n / tb / 1e9, exact=bool(ok01 and ok10))
        if pull:
            try:
                b1[:n].zero_()
                tp = _pull_copy(b1, a0, n, reps)
                if tp is not None:
                    torch.cuda.synchronize(d1)
                    out[n].update(tpull_s=tp, gbs_pull_01=n / tp / 1e9,
                                  pull_exact=bool(torch.equal(b1[:n].to(d0), a0[:n])))
            except Exception as exc:
                out[n].update(pull_error=repr(exc))
    del a0, a1, b0, b1
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ worker

def _barrier(store, tag: str, rank: int) -> None:
    store.set(f"bar/{tag}/{rank}", "1")
    store.wait([f"bar/{tag}/{r}" for r in range(R)], datetime.timedelta(seconds=120))


def _worker(kind: str, rank: int, port: int, args: argparse.Namespace, out) -> None:
    try:
        _run_rank(kind, rank, port, args, out)
        out.put((rank, "done", None))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
        sys.stdout.flush()
        os._exit(0)  # skip NIXL/UCX/NCCL teardown


def _run_rank(kind: str, rank: int, port: int, args: argparse.Namespace, out) -> None:
    from sglang_elastic.location.updater import ExpertLocationUpdater, StoreVote
    from sglang_elastic.transport import make_transport

    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
    t0 = time.perf_counter()
    transport = make_transport(kind, rank, store, device=str(device), connect_timeout_s=60)
    transport.set_peers(list(range(R)))
    setup_s = time.perf_counter() - t0

    # Time the transport's execute and the vote from outside (instance attributes shadow the methods).
    exec_log: List[float] = []
    orig_execute = transport.execute

    def timed_execute(copies, timeout_s):
        t = time.perf_counter()
        try:
            orig_execute(copies, timeout_s)
        finally:
            sync()
            exec_log.append(time.perf_counter() - t)

    transport.execute = timed_execute
    vote_log: List[float] = []

    def timed_vote(inner):
        def vote(seq, live, failed):
            t = time.perf_counter()
            try:
                return inner(seq, live, failed)
            finally:
                vote_log.append(time.perf_counter() - t)
        return vote

    plan_log: List[float] = []
    if args.diag:
        import sglang_elastic.location.updater as U

        orig_plan = U.plan_transfers

        def timed_plan(*a, **kw):
            t = time.perf_counter()
            try:
                return orig_plan(*a, **kw)
            finally:
                plan_log.append(time.perf_counter() - t)

        U.plan_transfers = timed_plan  # this process only

    L, S, m = args.layers, args.slots_per_rank, args.move
    shp = shapes(args)
    weights = {n: torch.empty((L, S) + s, dtype=torch.uint8, device=device) for n, s in shp.items()}
    expected = Expected(args, device)
    out.put((rank, "info", dict(setup_s=setup_s, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                                torch=torch.__version__, bytes_per_expert=bytes_per_expert(args))))

    def fill(p) -> None:
        for l in range(L):
            for s in range(S):
                e = int(p.phy2log[l, rank * S + s])
                for n in NAMES:
                    weights[n][l, s].copy_(expected.get(l, e, n))
        sync()

    def check(p, layers) -> Tuple[int, int]:
        checked = wrong = 0
        for l in layers:
            for s in range(S):
                e = int(p.phy2log[l, rank * S + s])
                checked += 1
                if not all(torch.equal(weights[n][l, s], expected.get(l, e, n)) for n in NAMES):
                    wrong += 1
        return checked, wrong

    configs = [(scen, chunk, False, args.warmup, args.repeats) for scen in args.scenarios for chunk in args.chunks]
    if args.backup_repeats > 0 and "swap" in args.scenarios:
        configs.append(("swap", 1, True, 1, args.backup_repeats))
    bar = 0
    for scen, chunk, backup, warmup, repeats in configs:
        pa, pb = placements(scen, L, S, m)
        fill(pa)
        tag = f"{kind}/{scen}/{chunk}/{int(backup)}"
        vote = timed_vote(StoreVote(store, rank, args.timeout_s + 5, prefix=f"vote/{tag}"))
        # Fresh names per configuration: re-registering "staging/w13" with a different row count trips
        # the transports' validation against the peer's cached metadata (see the report of issue 7).
        named = {f"{scen}.c{chunk}.b{int(backup)}/{n}": t for n, t in weights.items()}
        t0 = time.perf_counter()
        upd = ExpertLocationUpdater(rank, transport, named, pa, live_ranks=np.ones(R, dtype=bool),
                                    layers_per_chunk=chunk, backup=backup, timeout_s=args.timeout_s, vote=vote)
        fill_backup_s = None
        if backup:
            bar += 1
            _barrier(store, f"{kind}/{bar}", rank)
            t1 = time.perf_counter()
            upd.fill_backup()
            sync()
            fill_backup_s = time.perf_counter() - t1
        init_s = time.perf_counter() - t0
        steps, checked, wrong = [], 0, 0
        for it in range(warmup + repeats):
            target = pb if torch.equal(upd.placement.phy2log, pa.phy2log) else pa
            upd.begin(target)
            while not upd.done:
                bar += 1
                _barrier(store, f"{kind}/{bar}", rank)
                sync()
                exec_log.clear()
                vote_log.clear()
                plan_log.clear()
                t = time.perf_counter()
                rep = upd.step()
                sync()
                dt = time.perf_counter() - t
                c, w = check(upd.placement, rep.layers)
                checked += c
                wrong += w
                if it >= warmup:
                    steps.append(dict(dt=dt, exec=sum(exec_log), n_exec=len(exec_log), vote=sum(vote_log),
                                      plan=sum(plan_log),
                                      bytes=rep.bytes_moved, remote=rep.copies_remote, local=rep.copies_local,
                                      restored=rep.restored, layers=list(rep.layers), replans=rep.replans))
        c, w = check(upd.placement, range(L))
        if args.diag and not backup and chunk == max(args.chunks):
            try:
                raw = raw_wire(kind, transport, store, rank, named, pa, pb, chunk, S, args, sync, f"{tag}/raw")
                out.put((rank, "raw", dict(transport=kind, scenario=scen, chunk=chunk, **raw)))
            except Exception:
                out.put((rank, "raw", dict(transport=kind, scenario=scen, chunk=chunk, error=traceback.format_exc())))
        out.put((rank, "row", dict(transport=kind, scenario=scen, chunk=chunk, backup=backup, warmup=warmup,
                                   repeats=repeats, init_s=init_s, fill_backup_s=fill_backup_s,
                                   backup_mb=upd.backup_bytes() / 2**20, steps=steps,
                                   checked=checked + c, wrong=wrong + w)))
        del upd
        if cuda:
            torch.cuda.empty_cache()
    transport.close()


def raw_wire(kind, transport, store, rank, named, pa, pb, chunk, S, args, sync, tag) -> dict:
    """The chunk's cross-rank rows (A -> B, first ``chunk`` layers) moved by the transport's own wire
    primitives without the execute protocol: NIXL READs posted at once and spun on; one coalesced
    NCCL group of sends and recvs. Uses transport internals (diagnostic only)."""
    from sglang_elastic.location.plan import plan_transfers
    from sglang_elastic.location.updater import staging_name

    plan = plan_transfers(pa.phy2log[:chunk], pb.phy2log[:chunk], np.ones(R, dtype=bool), S)
    incoming, outgoing = [], []  # (peer, dst byte row / src byte row, src tensor name, src row)
    for (li, src, dst, e, p), ss in zip(plan.transfers.tolist(), plan.src_slots.tolist()):
        if src == dst:
            continue
        for wname in named:
            src_row = li * S + ss % S
            if dst == rank:
                incoming.append((src, transport._locals[staging_name(wname)].bytes[li * S + p % S], wname, src_row))
            elif src == rank:
                outgoing.append((dst, transport._locals[wname].bytes[src_row]))
    nbytes = sum(t.numel() for _, t, _, _ in incoming)

    def barrier(key):
        if kind != "nixl":
            return _barrier(store, key, rank)
        # Keep driving this agent while waiting: a READ over an emulated transport (host memory,
        # CPU runs) needs the target's progress; the execute protocol polls all the time too.
        store.set(f"bar/{key}/{rank}", "1")
        keys = [f"bar/{key}/{r}" for r in range(R)]
        end = time.monotonic() + 120
        while not store.check(keys):
            transport._agent.get_new_notifs()
            if time.monotonic() > end:
                raise TimeoutError(f"barrier {key}")

    times = []
    for i in range(args.ref_reps // 3 + 3):
        barrier(f"{tag}/{i}")
        sync()
        t = time.perf_counter()
        if kind == "nixl":
            pending = []
            for peer in sorted({x[0] for x in incoming}):
                meta = transport._peer_meta[peer]["tensors"]
                items = [(d, meta[n], r) for q, d, n, r in incoming if q == peer]
                pending += [(peer, h) for h in transport._post_reads(peer, items)]
            while pending:
                left = []
                for peer, h in pending:
                    st = transport._poll_read(peer, h)
                    if st == "ERR":
                        raise RuntimeError("raw NIXL read failed")
                    if st != "DONE":
                        left.append((peer, h))
                pending = left
        elif transport._group.nccl is not None:
            g = transport._group
            pg = g.nccl
            pg._start_coalescing()
            try:
                for peer, row in outgoing:
                    pg.send([row], g.index[peer], 0)
                for peer, row, _, _ in incoming:
                    pg.recv([row], g.index[peer], 0)
            finally:
                w = pg._end_coalescing()
            w.wait()
        else:  # CPU runs: gloo, one op per row
            g = transport._group
            works = [g.gloo.send([row], g.index[peer], 7) for peer, row in outgoing]
            works += [g.gloo.recv([row], g.index[peer], 7) for peer, row, _, _ in incoming]
            for w in works:
                w.wait()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    barrier(f"{tag}/end")
    return dict(recv_bytes=nbytes, send_rows=len(outgoing), recv_rows=len(incoming), times=times)


# ------------------------------------------------------------------------------------------ launcher

def launch(kind: str, args: argparse.Namespace) -> Dict[int, List[tuple]]:
    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, r, port, args, q), daemon=True) for r in range(R)]
    for p in procs:
        p.start()
    msgs: Dict[int, List[tuple]] = {r: [] for r in range(R)}
    done = set()
    deadline = time.monotonic() + args.deadline_s
    try:
        while len(done) < R and time.monotonic() < deadline:
            try:
                rank, what, payload = q.get(timeout=1)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            msgs[rank].append((what, payload))
            if what in ("done", "error"):
                done.add(rank)
                if what == "error":
                    print(f"[{kind} rank {rank}] failed:\n{payload}", flush=True)
            elif what == "raw":
                t = payload.get("times")
                print(f"[{kind} rank {rank}] raw wire {payload['scenario']} chunk={payload['chunk']}: "
                      + (f"recv {payload['recv_bytes'] / 1e6:.1f} MB, p50 {statistics.median(t) * 1e3:.3f} ms"
                         if t else f"error {payload.get('error')}"), flush=True)
            elif what == "row":
                st = payload["steps"]
                med = statistics.median(s["dt"] for s in st) * 1e3 if st else float("nan")
                print(f"[{kind} rank {rank}] {payload['scenario']} chunk={payload['chunk']} backup={payload['backup']}: "
                      f"{len(st)} steps, step p50 {med:.3f} ms, wrong {payload['wrong']}/{payload['checked']}",
                      flush=True)
            else:
                print(f"[{kind} rank {rank}] {what}: {json.dumps(payload, default=str)}", flush=True)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        del store
    if len(done) < R:
        print(f"[{kind}] workers did not finish within {args.deadline_s}s (finished: {sorted(done)})", flush=True)
    return msgs


def _q(xs: List[float], f: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(f * (len(xs) - 1)))))
    return xs[i]


def summarize(kind: str, msgs: Dict[int, List[tuple]], refs: Dict[int, dict]) -> List[dict]:
    rows: Dict[tuple, Dict[int, dict]] = {}
    for r, lst in msgs.items():
        for what, p in lst:
            if what == "row":
                rows.setdefault((p["scenario"], p["chunk"], p["backup"]), {})[r] = p
    out = []
    for (scen, chunk, backup), per in rows.items():
        if len(per) < R:
            out.append(dict(transport=kind, scenario=scen, chunk=chunk, backup=backup, error="a rank gave no result"))
            continue
        n = min(len(p["steps"]) for p in per.values())
        dt = [max(per[r]["steps"][i]["dt"] for r in per) for i in range(n)]
        ex = [max(per[r]["steps"][i]["exec"] for r in per) for i in range(n)]
        vo = [max(per[r]["steps"][i]["vote"] for r in per) for i in range(n)]
        pl = [max(per[r]["steps"][i].get("plan", 0.0) for r in per) for i in range(n)]
        # What the step spends outside plan + execute + vote (Copy lists, staging -> weights, commit), per rank.
        other = [max(s["dt"] - s["exec"] - s["vote"] - s.get("plan", 0.0) for s in (per[r]["steps"][i] for r in per))
                 for i in range(n)]
        by = [per[0]["steps"][i]["bytes"] for i in range(n)]
        agree = all(per[0]["steps"][i]["bytes"] == per[1]["steps"][i]["bytes"] for i in range(n))
        nbytes = statistics.median(by) if by else 0
        gbs = [b / t / 1e9 for b, t in zip(by, dt)]
        gbs_x = [b / t / 1e9 for b, t in zip(by, ex) if t > 0]
        ref = refs.get(int(nbytes), {})
        row = dict(transport=kind, scenario=scen, chunk=chunk, backup=backup, steps=n, bytes=nbytes,
                   bytes_agree=agree, remote=per[0]["steps"][0]["remote"] if n else 0,
                   step_ms_p50=statistics.median(dt) * 1e3 if n else float("nan"),
                   step_ms_p10=_q(dt, 0.1) * 1e3, step_ms_p90=_q(dt, 0.9) * 1e3,
                   step_ms_min=min(dt) * 1e3 if n else float("nan"), step_ms_max=max(dt) * 1e3 if n else float("nan"),
                   exec_ms_p50=statistics.median(ex) * 1e3 if n else float("nan"),
                   vote_ms_p50=statistics.median(vo) * 1e3 if n else float("nan"),
                   plan_ms_p50=statistics.median(pl) * 1e3 if n else float("nan"),
                   other_ms_p50=statistics.median(other) * 1e3 if n else float("nan"),
                   per_rank_steps={r: p["steps"] for r, p in per.items()},
                   gbs_step=statistics.median(gbs) if gbs else float("nan"),
                   gbs_exec=statistics.median(gbs_x) if gbs_x else float("nan"),
                   checked=sum(p["checked"] for p in per.values()), wrong=sum(p["wrong"] for p in per.values()),
                   fill_backup_s=max((p["fill_backup_s"] or 0) for p in per.values()) if backup else None,
                   backup_mb=per[0]["backup_mb"], init_s=max(p["init_s"] for p in per.values()))
        if ref:
            row.update(copy_gbs=ref["gbs_01"], bidir_gbs=ref["gbs_bidir"],
                       pct_copy=100 * row["gbs_step"] / ref["gbs_01"], pct_bidir=100 * row["gbs_step"] / ref["gbs_bidir"],
                       pct_copy_exec=100 * row["gbs_exec"] / ref["gbs_01"])
        out.append(row)
    return out


def summarize_raw(kind: str, msgs: Dict[int, List[tuple]], refs: Dict[int, dict]) -> List[dict]:
    per: Dict[tuple, Dict[int, dict]] = {}
    for r, lst in msgs.items():
        for what, p in lst:
            if what == "raw":
                per.setdefault((p["scenario"], p["chunk"]), {})[r] = p
    out = []
    for (scen, chunk), pr in per.items():
        errs = [p["error"] for p in pr.values() if "error" in p]
        if errs or len(pr) < R:
            out.append(dict(transport=kind, scenario=scen, chunk=chunk, error=(errs or ["a rank gave no result"])[0]))
            continue
        n = min(len(p["times"]) for p in pr.values())
        t = [max(pr[r]["times"][i] for r in pr) for i in range(n)]
        nbytes = sum(p["recv_bytes"] for p in pr.values())
        row = dict(transport=kind, scenario=scen, chunk=chunk, bytes=nbytes, reps=n,
                   ms_p50=statistics.median(t) * 1e3, gbs=nbytes / statistics.median(t) / 1e9)
        ref = refs.get(int(nbytes))
        if ref:
            row.update(copy_gbs=ref["gbs_01"], pct_copy=100 * row["gbs"] / ref["gbs_01"],
                       bidir_gbs=ref["gbs_bidir"], pull_gbs=ref.get("gbs_pull_01"))
        out.append(row)
    return out


def _f(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def print_tables(rows: List[dict], refs: Dict[int, dict], info: dict, args) -> None:
    bpe = bytes_per_expert(args)
    print(f"\n== layerwise expert transfer, 2 ranks ({info.get('device', '?')}, torch {info.get('torch', '?')}): "
          f"{args.layers} layers x {args.slots_per_rank} slots/rank, expert = {bpe} B ({bpe / 1e6:.1f} MB, uint8), "
          f"{args.move} experts/layer moved per direction (swap) or 0->1 (oneway); backup store off unless noted")
    if refs:
        print("\nReference: plain dst.copy_(src) between the GPUs (medians; GB/s = 1e9 B/s)")
        print(f"{'MB':>9} | {'0->1 us':>9} {'0->1 GB/s':>10} | {'1->0 GB/s':>10} | {'bidir us':>9} {'bidir GB/s':>10} | "
              f"{'pull 0->1 GB/s':>14} | exact")
        for n in sorted(refs):
            r = refs[n]
            ex = r["exact"] and r.get("pull_exact", True)
            print(f"{n / 1e6:>9.1f} | {r['t01_s'] * 1e6:>9.1f} {r['gbs_01']:>10.1f} | {r['gbs_10']:>10.1f} | "
                  f"{r['tbidir_s'] * 1e6:>9.1f} {r['gbs_bidir']:>10.1f} | {_f(r.get('gbs_pull_01')):>14} | "
                  f"{'yes' if ex else 'NO'}")
    print("\nUpdater steps (one step = one chunk moved + committed), slowest rank per step, medians over steps:")
    hdr = (f"{'transport':>9} {'scenario':>8} {'chunk':>5} {'backup':>6} {'steps':>5} {'MB/chunk':>9} {'xfers':>5} | "
           f"{'step ms':>8} {'p10-p90':>15} {'exec ms':>8} {'vote ms':>8} | {'GB/s':>7} {'exec GB/s':>9} | "
           f"{'copy GB/s':>9} {'%copy':>6} {'%copy(ex)':>9} {'bidir':>7} {'%bidir':>6} | {'exact':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['transport']:>9} {r['scenario']:>8} {r['chunk']:>5} {str(r['backup']):>6} | {r['error']}")
            continue
        exact = f"{r['checked'] - r['wrong']}/{r['checked']}" + ("" if r["wrong"] == 0 else " BAD")
        print(f"{r['transport']:>9} {r['scenario']:>8} {r['chunk']:>5} {('on' if r['backup'] else 'off'):>6} "
              f"{r['steps']:>5} {r['bytes'] / 1e6:>9.1f} {r['remote']:>5} | {_f(r['step_ms_p50'], 3):>8} "
              f"{_f(r['step_ms_p10'], 2) + '-' + _f(r['step_ms_p90'], 2):>15} {_f(r['exec_ms_p50'], 3):>8} "
              f"{_f(r['vote_ms_p50'], 3):>8} | {_f(r['gbs_step']):>7} {_f(r['gbs_exec']):>9} | "
              f"{_f(r.get('copy_gbs')):>9} {_f(r.get('pct_copy')):>6} {_f(r.get('pct_copy_exec')):>9} "
              f"{_f(r.get('bidir_gbs')):>7} {_f(r.get('pct_bidir')):>6} | {exact:>11}")
    if any("plan_ms_p50" in r for r in rows) and getattr(args, "diag", False):
        print("\nWhere a step's time goes (medians of the slowest rank, ms): plan = plan_transfers; exec = "
              "transport.execute; vote = StoreVote; other = the rest of step() (Copy lists, staging -> weights "
              "copies, commit, device sync)")
        print(f"{'transport':>9} {'scenario':>8} {'chunk':>5} {'backup':>6} | {'step':>8} {'plan':>7} {'exec':>8} "
              f"{'vote':>7} {'other':>7}")
        for r in rows:
            if "error" in r:
                continue
            print(f"{r['transport']:>9} {r['scenario']:>8} {r['chunk']:>5} {('on' if r['backup'] else 'off'):>6} | "
                  f"{_f(r['step_ms_p50'], 3):>8} {_f(r['plan_ms_p50'], 3):>7} {_f(r['exec_ms_p50'], 3):>8} "
                  f"{_f(r['vote_ms_p50'], 3):>7} {_f(r['other_ms_p50'], 3):>7}")
    raw = info.get("raw_rows") or []
    if raw:
        print("\nRaw wire, no protocol (the chunk's rows via the transport's own primitives: NIXL READs posted "
              "at once and spun on / one coalesced NCCL group), slowest rank, medians:")
        print(f"{'transport':>9} {'scenario':>8} {'chunk':>5} | {'MB':>8} {'ms':>8} {'GB/s':>7} | {'copy GB/s':>9} "
              f"{'%copy':>6} {'bidir GB/s':>10} {'pull GB/s':>9}")
        for r in raw:
            if "error" in r:
                print(f"{r['transport']:>9} {r['scenario']:>8} {r['chunk']:>5} | error: "
                      f"{str(r['error']).strip().splitlines()[-1]}")
                continue
            print(f"{r['transport']:>9} {r['scenario']:>8} {r['chunk']:>5} | {r['bytes'] / 1e6:>8.1f} "
                  f"{r['ms_p50']:>8.3f} {r['gbs']:>7.1f} | {_f(r.get('copy_gbs')):>9} {_f(r.get('pct_copy')):>6} "
                  f"{_f(r.get('bidir_gbs')):>10} {_f(r.get('pull_gbs')):>9}")
    for r in rows:
        if r.get("backup"):
            print(f"\nbackup row ({r['transport']}): fill_backup {_f(r['fill_backup_s'], 2)} s, "
                  f"{_f(r['backup_mb'], 0)} MiB host memory per rank")
    print("\nxfers = cross-rank expert copies per chunk (both directions); MB/chunk = ChunkReport.bytes_moved; "
          "exact = slots equal byte for byte to their expert / slots checked (both ranks, after every step).")


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.perf_counter()
    result = dict(args=vars(args).copy(), refs={}, rows=[], info={}, errors=[])
    bpe = bytes_per_expert(args)
    sizes = {bpe}
    for scen in args.scenarios:
        per_layer = (2 if scen == "swap" else 1) * args.move * bpe
        for c in args.chunks:
            sizes.add(per_layer * min(c, args.layers))
        if scen == "swap" and args.backup_repeats > 0:
            sizes.add(per_layer)
    refs: Dict[int, dict] = {}
    if not args.smoke:
        if torch.cuda.device_count() < 2:
            print(f"needs 2 GPUs, found {torch.cuda.device_count()}", flush=True)
            return 2
        result["info"]["peer_access"] = torch.cuda.can_device_access_peer(0, 1)
        result["info"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        refs = reference_copies(sorted(sizes), args.ref_reps, pull=args.diag)
        result["refs"] = {str(k): v for k, v in refs.items()}
        print(f"peer access 0<->1: {result['info']['peer_access']}; reference copies: "
              + ", ".join(f"{n / 1e6:.0f} MB {r['gbs_01']:.0f} GB/s" for n, r in sorted(refs.items())), flush=True)
    info = {}
    for kind in args.transports:
        t0 = time.perf_counter()
        try:
            msgs = launch(kind, args)
        except Exception:
            tb = traceback.format_exc()
            print(f"[{kind}] launch failed:\n{tb}", flush=True)
            result["errors"].append(dict(transport=kind, error=tb))
            continue
        for r, lst in msgs.items():
            for what, p in lst:
                if what == "info" and r == 0:
                    info = p
                    result["info"].setdefault("workers", {})[kind] = p
                if what == "error":
                    result["errors"].append(dict(transport=kind, rank=r, error=p))
        result["rows"].extend(summarize(kind, msgs, refs))
        result.setdefault("raw", []).extend(summarize_raw(kind, msgs, refs))
        result["info"].setdefault("wall_s", {})[kind] = time.perf_counter() - t0
        if args.out:  # partial results survive a later hang
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    result["info"]["total_s"] = time.perf_counter() - t_start
    info = dict(info, raw_rows=result.get("raw", []))
    print_tables(result["rows"], refs, info, args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    bad = any(r.get("wrong") for r in result["rows"]) or any("error" in r for r in result["rows"]) or result["errors"]
    print(f"\ntotal {result['info']['total_s']:.1f} s; {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Token dispatch on 2 GPUs (EP2): raw ``nixl_ep`` vs our ``nixl`` dispatcher vs our torch/NCCL dispatcher.

    python bench/bench_dispatch.py                              # 128, 512, 4096 tokens/rank, bf16 and fp8
    python bench/bench_dispatch.py --experts 256 --slots-per-rank 144 --tokens 128
    python bench/bench_dispatch.py --failover                   # SIGKILL a rank mid-loop, time detection

One process per GPU (spawned here; the TCPStore is served by this process, as an orchestrator
would). For every token count T (``max_tokens_per_rank = T``), hidden 7168, top-8, over
``--experts`` logical experts on ``2 x --slots-per-rank`` physical slots (default 16 on 16: S = 8),
bf16 and fp8 dispatch (bf16 combine), one step is dispatch -> (a fixed bf16 expert output) ->
combine, and the table shows per-step medians over ``--iters`` steps x ``--rounds`` rounds:

* ``raw``: ``nixl_ep.Buffer.dispatch/combine`` on physical ids routed once beforehand;
* ``ours``: :class:`NixlEPDispatcher` (routing with the live mask + load record + stats on the GPU,
  nixl_ep, mask query and failure accounting after combine), ``check_inputs=False``;
* ``torch``: :class:`TorchDispatcher` over NCCL (all-to-all of headers and rows, host-planned).

raw and ours alternate round by round in the same processes (same buffer), so ``ours/raw`` is a
same-run ratio. Times are CUDA events on the compute stream around each call (``disp``, ``comb``)
and around the step (``step``); ``wall`` is host time per step over a round (it shows host-bound
steps); ``host`` is the host time to issue one step while the GPU is kept busy (no waiting on it). ``--graph`` (default on) also times raw and ours captured in a CUDA graph (one step per
replay), which removes host launch costs as SGLang's decode does.

Correctness (same inputs, same placement, an elementwise per-expert function as the experts):
our nixl dispatcher's combined output vs the torch dispatcher's and vs a single-process float32
reference; max abs error, max error relative to max |reference|, and the fraction of tokens equal
bit for bit.

``--failover``: placement with every expert on both ranks, rank 1 SIGKILLs itself between dispatch
and combine of step ``--kill-step``; the survivor reports when nixl_ep masked it (``timeout_s =
--failover-timeout``), how long that step took, whether every later step is exact, and how long
``set_peers`` (disconnect) takes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

# (sglang_elastic.dispatch loads kernels/ itself when the checkout is used without `pip install -e .`.)
R = 2


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="128,512,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16, help="logical experts")
    ap.add_argument("--slots-per-rank", type=int, default=None, help="physical slots per rank (default E / 2)")
    ap.add_argument("--dtypes", default="bf16,fp8", help="dispatch dtypes: bf16, fp8")
    ap.add_argument("--iters", type=int, default=100, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--torch-iters", type=int, default=30)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch/NCCL dispatcher")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="nixl_ep kernel timeout")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="give up on the workers after this")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--failover", action="store_true")
    ap.add_argument("--failover-timeout", type=float, default=1.0)
    ap.add_argument("--failover-steps", type=int, default=40)
    ap.add_argument("--kill-step", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.tokens = [int(t) for t in str(args.tokens).split(",") if t]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.slots_per_rank is None:
        args.slots_per_rank = -(-args.experts // R)
    if R * args.slots_per_rank < args.experts:
        ap.error(f"{R} x {args.slots_per_rank} slots cannot hold {args.experts} experts")
    return args


# ------------------------------------------------------------------------------------------ shared helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_coeffs(layer: int, expert: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-logical-expert (a, b) of the test expert ``y = x * a + b`` (exact in bf16)."""
    e = expert.to(torch.float32)
    a = 1.0 + 0.125 * ((e + 3 * layer) % 7)
    b = 0.25 * ((e * 5 + layer) % 11) - 1.0
    return a.to(dtype), b.to(dtype)


def run_experts(hidden: torch.Tensor, scale: Optional[torch.Tensor], slot_logical: torch.Tensor,
                layer: int = 0) -> torch.Tensor:
    """This rank's experts on its dispatched rows ``[S, N, H]`` (fp8 rows dequantised first), bf16 out."""
    from sglang_elastic.dispatch import layout

    if scale is not None:
        hidden = layout.dequantize_fp8(hidden, scale, torch.bfloat16)
    a, b = expert_coeffs(layer, slot_logical, torch.bfloat16)
    return (hidden * a[:, None, None] + b[:, None, None]).contiguous()


def reference(x, ids, w, placement, layer: int, token_offset: int, fp8: bool) -> torch.Tensor:
    """One MoE layer in one process with the dispatchers' routing (float32 sum over top-k, k in order)."""
    from sglang_elastic.dispatch import layout
    from sglang_elastic.dispatch.routing import RoutingTable, route

    table = RoutingTable.from_placement(placement, x.device)
    routed = route(ids, w, table, layer, torch.ones(R, dtype=torch.int32, device=x.device), token_offset=token_offset)
    xin = layout.dequantize_fp8(*layout.quantize_fp8(x), x.dtype) if fp8 else x
    a, b = expert_coeffs(layer, routed.logical.clamp(min=0), x.dtype)
    pair = xin[:, None, :] * a[..., None] + b[..., None]
    pair = torch.where((routed.phys >= 0)[..., None], pair, torch.zeros_like(pair))
    return layout.weighted_sum(pair, routed.weights, x.dtype)


def inputs(seed: int, T: int, H: int, E: int, K: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (multiples of 1/8, exact in bf16), distinct top-k logical ids, positive weights."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-64, 64, (T, H), generator=g).float() / 8).to(torch.bfloat16)
    ids = torch.randn(T, E, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g) + 0.1
    return x.to(device), ids.to(device), w.to(device)


def _median_us(xs: List[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else float("nan")


class _Timer:
    """CUDA events around dispatch, combine and the step, for n steps; host wall time for the block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
        self.i = 0
        self.wall = 0.0

    def run(self, dispatch: Callable[[], object], combine: Callable[[object], object]) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for e0, e1, e2 in self.ev:
            e0.record()
            h = dispatch()
            e1.record()
            combine(h)
            e2.record()
        torch.cuda.synchronize()
        self.wall = (time.perf_counter() - t0) / self.n

    def result(self) -> Dict[str, List[float]]:
        return dict(disp=[a.elapsed_time(b) for a, b, _ in self.ev], comb=[b.elapsed_time(c) for _, b, c in self.ev],
                    step=[a.elapsed_time(c) for a, _, c in self.ev])


# ------------------------------------------------------------------------------------------ bench worker

def _exit_worker(out) -> None:
    """Flush the result queue, then leave without nixl_ep's teardown (a peer may be gone)."""
    out.close()
    out.join_thread()
    sys.stdout.flush()
    os._exit(0)


def _bench_worker(rank: int, port: int, args: argparse.Namespace, out) -> None:
    try:
        _bench(rank, port, args, out)
        out.put((rank, "done", None))
    except Exception:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        _exit_worker(out)


def _setup_rank(rank: int, port: int):
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] or [str(i) for i in range(R)]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[rank]
    torch.cuda.set_device(0)
    return torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=300))


def _bench(rank: int, port: int, args: argparse.Namespace, out) -> None:
    from sglang_elastic.dispatch import make_dispatcher
    from sglang_elastic.eplb import Placement
    from sglang_elastic.state import ElasticEPState

    store = _setup_rank(rank, port)
    dev = torch.device("cuda", 0)
    E, S, H, K = args.experts, args.slots_per_rank, args.hidden, args.topk
    placement = Placement.trivial(1, E, R, S)
    slot_logical = placement.phy2log[0, rank * S:(rank + 1) * S].to(dev)
    state = ElasticEPState(R, device=dev)

    def put(kind, **kw):
        out.put((rank, kind, kw))

    # One nixl dispatcher per token count (M = T); the first, largest, sizes the shared buffer.
    t0 = time.perf_counter()
    nixl = {}
    for T in sorted(args.tokens, reverse=True):
        for fp8 in sorted({d == "fp8" for d in args.dtypes}):
            nixl[(T, fp8)] = make_dispatcher("nixl", path="gpu", rank=rank, num_ranks=R, num_local_experts=S,
                                             hidden=H, num_topk=K, max_tokens_per_rank=T, placement=placement,
                                             state=state, store=store, use_fp8=fp8, device=dev,
                                             timeout_s=args.timeout_s, record_load=True)
    first = next(iter(nixl.values()))
    put("info", setup_s=time.perf_counter() - t0, triton=first._use_triton, rdma_bytes=first._shared.rdma_bytes,
        device=torch.cuda.get_device_name(dev), torch=torch.__version__)
    buf = first.buffer

    for T in args.tokens:
        for dname in args.dtypes:
            fp8 = dname == "fp8"
            d = nixl[(T, fp8)]
            x, ids, w = inputs(args.seed * 7919 + T * 10 + rank, T, H, E, K, dev)
            routed, idx = d._route_ids(ids, w, 0, None)
            phys, wts = idx.clone(), routed.weights.clone()  # nixl_ep's id dtype (int32 in nixl 1.4)
            y = torch.randn(S, R * T, H, device=dev).to(torch.bfloat16)

            def raw_d():
                return buf.dispatch(x, phys, T, R * S, use_fp8=fp8, async_finish=False, return_recv_hook=False)[2]

            def raw_c(h):
                return buf.combine(y, phys, wts, h, async_finish=False, return_recv_hook=False)[0]

            def ours_d():
                return d.dispatch(x, ids, w, layer=0, check_inputs=False).handle

            def ours_c(h):
                return d.combine(y, h)

            res = {"raw": dict(disp=[], comb=[], step=[], wall=[]), "ours": dict(disp=[], comb=[], step=[], wall=[])}
            for name, (fd, fc) in (("raw", (raw_d, raw_c)), ("ours", (ours_d, ours_c))):
                for _ in range(args.warmup):
                    fc(fd())
            for rnd in range(args.rounds):
                order = (("raw", raw_d, raw_c), ("ours", ours_d, ours_c))
                for name, fd, fc in (order if rnd % 2 == 0 else order[::-1]):
                    tm = _Timer(args.iters)
                    tm.run(fd, fc)
                    r = tm.result()
                    for k in ("disp", "comb", "step"):
                        res[name][k] += r[k]
                    res[name]["wall"].append(tm.wall)
            row = dict(T=T, dtype=dname)
            for name in ("raw", "ours"):
                for k in ("disp", "comb", "step"):
                    row[f"{name}_{k}"] = _median_us(res[name][k])
                row[f"{name}_wall"] = statistics.median(res[name]["wall"]) * 1e6
            # Host time to issue one step, GPU kept busy behind a sleep so the host never waits on it.
            for name, fd, fc in (("raw", raw_d, raw_c), ("ours", ours_d, ours_c)):
                host = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    torch.cuda._sleep(int(2e6 * 40))  # ~40 ms of GPU clock cycles ahead of the steps
                    t0 = time.perf_counter()
                    for _ in range(32):
                        fc(fd())
                    host.append((time.perf_counter() - t0) / 32)
                    torch.cuda.synchronize()
                row[f"{name}_host"] = statistics.median(host) * 1e6
            put("eager", **row)

            if not args.no_graph:
                row = dict(T=T, dtype=dname)
                try:
                    for name, fd, fc in (("raw", raw_d, raw_c), ("ours", ours_d, ours_c)):
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            for _ in range(3):
                                fc(fd())
                        torch.cuda.current_stream().wait_stream(side)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            fc(fd())
                        for _ in range(args.warmup):
                            g.replay()
                        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                              for _ in range(args.iters * args.rounds)]
                        torch.cuda.synchronize()
                        for a, b in ev:
                            a.record()
                            g.replay()
                            b.record()
                        torch.cuda.synchronize()
                        row[f"{name}_step"] = _median_us([a.elapsed_time(b) for a, b in ev])
                        del g
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                put("graph", **row)

    # Correctness and the torch/NCCL dispatcher, per config.
    for T in args.tokens:
        for dname in args.dtypes:
            fp8 = dname == "fp8"
            d = nixl[(T, fp8)]
            x, ids, w = inputs(args.seed * 104729 + T * 10 + rank + 1, T, H, E, K, dev)
            o = d.dispatch(x, ids, w, layer=0)
            got = d.combine(run_experts(o.hidden_states, o.hidden_states_scale, slot_logical), o.handle).clone()
            ref = reference(x, ids, w, placement, 0, rank * T, fp8)
            row = dict(T=T, dtype=dname, **_errors("nixl_ref", got, ref))
            if not args.no_torch:
                td = None
                try:
                    # A namespace of its own per config: a second TorchDispatcher over the same store
                    # namespace can read a peer's previous incarnation and form a different group.
                    td = make_dispatcher("torch", path="gpu", rank=rank, num_ranks=R, num_local_experts=S, hidden=H,
                                         num_topk=K, max_tokens_per_rank=T, placement=placement,
                                         state=ElasticEPState(R, device=dev), use_fp8=fp8, device=dev,
                                         store=torch.distributed.PrefixStore(f"bench/torch/{T}/{dname}", store),
                                         timeout_s=60.0)
                    o2 = td.dispatch(x, ids, w, layer=0)
                    got2 = td.combine(run_experts(o2.hidden_states, o2.hidden_states_scale, slot_logical), o2.handle)
                    row.update(_errors("torch_ref", got2, ref))
                    row.update(_errors("nixl_torch", got, got2))
                    ty = torch.randn(S, R * T, H, device=dev).to(torch.bfloat16)
                    for _ in range(3):
                        td.combine(ty, td.dispatch(x, ids, w, layer=0, check_inputs=False).handle)
                    tm = _Timer(args.torch_iters)
                    tm.run(lambda: td.dispatch(x, ids, w, layer=0, check_inputs=False).handle,
                           lambda h: td.combine(ty, h))
                    r = tm.result()
                    row.update(torch_disp=_median_us(r["disp"]), torch_comb=_median_us(r["comb"]),
                               torch_step=_median_us(r["step"]), torch_wall=tm.wall * 1e6)
                except Exception as exc:
                    row["torch_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    if td is not None:
                        td.close()
            put("check", **row)
    put("stats", **first.stats.as_dict(), live=state.live_ranks())


def _errors(prefix: str, got: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    err = (got.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp(min=1e-30)
    return {f"{prefix}_max_abs": float(err.max()) if err.numel() else 0.0,
            f"{prefix}_rel": float(err.max() / scale) if err.numel() else 0.0,
            f"{prefix}_exact": float((got == ref).all(1).float().mean()) if got.numel() else 1.0,
            f"{prefix}_nan": int(torch.isnan(got.float()).sum())}


# ------------------------------------------------------------------------------------------ failover worker

def _failover_worker(rank: int, port: int, args: argparse.Namespace, out) -> None:
    try:
        _failover(rank, port, args, out)
        out.put((rank, "done", None))
    except Exception:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        _exit_worker(out)


def _failover(rank: int, port: int, args: argparse.Namespace, out) -> None:
    from sglang_elastic.dispatch import make_dispatcher
    from sglang_elastic.eplb import Placement
    from sglang_elastic.state import ElasticEPState

    store = _setup_rank(rank, port)
    dev = torch.device("cuda", 0)
    E = S = 8
    H, K, T = args.hidden, args.topk, min(args.tokens)
    placement = Placement(torch.arange(E).repeat(R)[None], R, E)  # every expert on both ranks
    state = ElasticEPState(R, device=dev)
    d = make_dispatcher("nixl", path="gpu", rank=rank, num_ranks=R, num_local_experts=S, hidden=H, num_topk=K,
                        max_tokens_per_rank=T, placement=placement, state=state, store=store, device=dev,
                        timeout_s=args.failover_timeout)
    victim = 1

    def slot_logical():
        return placement.phy2log[0, rank * S:(rank + 1) * S].to(dev)

    t_detect = None
    steps = []
    for step in range(args.failover_steps):
        x, ids, w = inputs(step * 31 + rank, T, H, E, K, dev)
        live_before = state.active_ranks.clone()
        t0 = time.time()
        o = d.dispatch(x, ids, w, layer=0, check_inputs=False)
        y = run_experts(o.hidden_states, o.hidden_states_scale, slot_logical())
        if rank == victim and step == args.kill_step:
            torch.cuda.synchronize()
            store.set("failover/kill_t", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        got = d.combine(y, o.handle)
        torch.cuda.synchronize()
        t_combined = time.time()
        newly = d.poll_failures()
        t1 = time.time()
        if newly and t_detect is None:
            t_detect = t_combined
        ref = reference(x, ids, w, placement, 0, rank * T, False)
        table_routed = _route_ref(ids, w, placement, live_before, rank * T)
        lost_tok = ((table_routed >= 0) & (table_routed // S == victim)).any(1) if rank != victim else None
        wrong = ~torch.isclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2).all(1)
        steps.append(dict(step=step, dt=t1 - t0, wrong=int(wrong.sum()),
                          wrong_not_lost=int((wrong & ~lost_tok).sum()) if lost_tok is not None else int(wrong.sum()),
                          lost_tokens=int(lost_tok.sum()) if lost_tok is not None else 0,
                          newly=newly, live_dev=state.active_ranks.tolist(), rows=int(o.hidden_states.shape[1])))
        if t_detect is not None and step > args.kill_step + 5:
            break
    kill_t = float(store.get("failover/kill_t").decode())
    res = dict(steps=steps, kill_t=kill_t, detect_s=(t_detect - kill_t) if t_detect else None,
               timeout_s=args.failover_timeout, stats=d.stats.as_dict())
    out.put((rank, "failover", res))
    # Membership change: drop the dead peer (nixl_ep disconnect), then one more step.
    box = {}

    def disconnect():
        t = time.time()
        try:
            d.set_peers([rank])
            box["s"] = time.time() - t
        except Exception as exc:
            box["err"] = f"{type(exc).__name__}: {exc}"

    th = threading.Thread(target=disconnect, daemon=True)
    th.start()
    th.join(20)
    after = dict(disconnect_s=box.get("s"), error=box.get("err"), hung=th.is_alive())
    if "s" in box:
        x, ids, w = inputs(999 + rank, T, H, E, K, dev)
        o = d.dispatch(x, ids, w, layer=0)
        got = d.combine(run_experts(o.hidden_states, o.hidden_states_scale, slot_logical()), o.handle)
        ref = reference(x, ids, w, placement, 0, rank * T, False)
        after.update(rows=int(o.hidden_states.shape[1]),
                     wrong=int((~torch.isclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2).all(1)).sum()))
    out.put((rank, "after", after))


def _route_ref(ids, w, placement, live, offset) -> torch.Tensor:
    from sglang_elastic.dispatch.routing import RoutingTable, route

    return route(ids, w, RoutingTable.from_placement(placement, ids.device), 0, live, token_offset=offset).phys


# ------------------------------------------------------------------------------------------ launcher

def _launch(target, args: argparse.Namespace, expect_dead: Tuple[int, ...] = ()) -> Dict[int, List[tuple]]:
    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, args, q), daemon=True) for r in range(R)]
    for p in procs:
        p.start()
    msgs: Dict[int, List[tuple]] = {r: [] for r in range(R)}
    done = set(expect_dead)
    deadline = time.monotonic() + args.deadline_s
    try:
        while len(done) < R and time.monotonic() < deadline:
            try:
                rank, kind, payload = q.get(timeout=1)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            msgs[rank].append((kind, payload))
            if kind in ("done", "error"):
                done.add(rank)
                if kind == "error":
                    print(f"rank {rank} failed:\n{payload}", flush=True)
            elif kind != "stats":
                print(f"[rank {rank}] {kind}: {json.dumps(payload, default=str)}", flush=True)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        del store
    if len(done) < R:
        print(f"workers did not finish within {args.deadline_s}s (finished: {sorted(done)})", flush=True)
    return msgs


def _fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def _print_tables(msgs: Dict[int, List[tuple]], args: argparse.Namespace) -> dict:
    by = {r: {} for r in msgs}
    for r, lst in msgs.items():
        for kind, p in lst:
            by[r].setdefault(kind, []).append(p)
    info = (by[0].get("info") or [{}])[0]
    print(f"\n== dispatch on {R} GPUs ({info.get('device', '?')}, torch {info.get('torch', '?')}): hidden {args.hidden}, "
          f"top-{args.topk}, {args.experts} logical experts on {R}x{args.slots_per_rank} slots; medians in us "
          f"over {args.rounds}x{args.iters} steps; Triton routing: {info.get('triton')}")
    checks = {(c["T"], c["dtype"]): c for c in by[0].get("check", [])}
    print("\nEager (rank 0; rank 1 in the JSON):")
    hdr = (f"{'T':>5} {'dtype':>5} | {'raw disp':>8} {'raw comb':>8} {'raw step':>8} {'raw wall':>8} {'raw host':>8} | "
           f"{'ours disp':>9} {'ours comb':>9} {'ours step':>9} {'ours wall':>9} {'ours host':>9} | {'step ratio':>10} "
           f"{'wall ratio':>10} | {'torch step':>10} {'torch/raw':>9}")
    print(hdr)
    print("-" * len(hdr))
    for e in by[0].get("eager", []):
        c = checks.get((e["T"], e["dtype"]), {})
        ts = c.get("torch_step")
        print(f"{e['T']:>5} {e['dtype']:>5} | {_fmt(e['raw_disp']):>8} {_fmt(e['raw_comb']):>8} {_fmt(e['raw_step']):>8} "
              f"{_fmt(e['raw_wall']):>8} {_fmt(e.get('raw_host')):>8} | {_fmt(e['ours_disp']):>9} {_fmt(e['ours_comb']):>9} "
              f"{_fmt(e['ours_step']):>9} {_fmt(e['ours_wall']):>9} {_fmt(e.get('ours_host')):>9} | "
              f"{e['ours_step'] / e['raw_step']:>10.3f} "
              f"{e['ours_wall'] / e['raw_wall']:>10.3f} | {_fmt(ts):>10} "
              f"{(ts / e['raw_step']) if ts else float('nan'):>9.2f}")
    graph = by[0].get("graph", [])
    if graph:
        print("\nCUDA graph, one step per replay (rank 0):")
        print(f"{'T':>5} {'dtype':>5} | {'raw step':>8} | {'ours step':>9} | {'ratio':>6}")
        for g in graph:
            if "error" in g:
                print(f"{g['T']:>5} {g['dtype']:>5} | capture failed: {g['error']}")
            else:
                print(f"{g['T']:>5} {g['dtype']:>5} | {_fmt(g['raw_step']):>8} | {_fmt(g['ours_step']):>9} | "
                      f"{g['ours_step'] / g['raw_step']:>6.3f}")
    if checks:
        print("\nCorrectness (combined outputs; rel = max |err| / max |reference|; exact = tokens equal bit for bit):")
        print(f"{'rank':>4} {'T':>5} {'dtype':>5} | {'nixl vs torch: max abs':>22} {'rel':>9} {'exact':>6} | "
              f"{'nixl vs ref: rel':>16} {'exact':>6} | {'torch vs ref: rel':>17} {'exact':>6}")
        for r in sorted(by):
            for c in by[r].get("check", []):
                print(f"{r:>4} {c['T']:>5} {c['dtype']:>5} | {_fmt(c.get('nixl_torch_max_abs'), 4):>22} "
                      f"{_fmt(c.get('nixl_torch_rel'), 6):>9} {_fmt(c.get('nixl_torch_exact'), 3):>6} | "
                      f"{_fmt(c.get('nixl_ref_rel'), 6):>16} {_fmt(c.get('nixl_ref_exact'), 3):>6} | "
                      f"{_fmt(c.get('torch_ref_rel'), 6):>17} {_fmt(c.get('torch_ref_exact'), 3):>6}"
                      + (f"  torch: {c['torch_error']}" if "torch_error" in c else ""))
    for r in sorted(by):
        for s in by[r].get("stats", []):
            print(f"rank {r} stats: {s}")
    return by


def _print_failover(msgs: Dict[int, List[tuple]], args: argparse.Namespace) -> dict:
    by = {r: {k: p for k, p in lst} for r, lst in msgs.items()}
    fo = by[0].get("failover")
    print(f"\n== failover: rank 1 SIGKILLed between dispatch and combine of step {args.kill_step}; nixl_ep timeout "
          f"{args.failover_timeout}s; every expert on both ranks")
    if not fo:
        print("no result from the survivor")
        return by
    print(f"{'step':>4} {'dt (s)':>8} {'rows':>5} {'wrong':>5} {'lost tok':>8} {'wrong, not lost':>15} newly-failed  live(dev)")
    for s in fo["steps"]:
        if s["step"] >= args.kill_step - 1:
            print(f"{s['step']:>4} {s['dt']:>8.4f} {s['rows']:>5} {s['wrong']:>5} {s['lost_tokens']:>8} "
                  f"{s['wrong_not_lost']:>15} {str(s['newly']):>12}  {s['live_dev']}")
    after_kill = [s for s in fo["steps"] if s["step"] > args.kill_step]
    print(f"detection (kill -> combine that masked it returned, then poll_failures): {_fmt(fo['detect_s'], 3)} s; "
          f"later steps wrong: {sum(s['wrong'] for s in after_kill)}; stats: {fo['stats']}")
    a = by[0].get("after")
    if a:
        print(f"set_peers([0]) (disconnect_ranks([1])): {a}")
    return by


def main(argv=None) -> int:
    args = _parse(argv)
    if torch.cuda.device_count() < R:
        print(f"needs {R} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if args.failover:
        msgs = _launch(_failover_worker, args, expect_dead=(1,))
        by = _print_failover(msgs, args)
    else:
        msgs = _launch(_bench_worker, args)
        by = _print_tables(msgs, args)
    if args.out:
        Path(args.out).write_text(json.dumps({str(r): v for r, v in by.items()}, indent=1, default=str))
    errors = [p for lst in msgs.values() for k, p in lst if k == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

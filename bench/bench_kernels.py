"""Triton dispatch kernels vs their torch references: time, effective bandwidth, and bit-equality.

    python bench/bench_kernels.py                 # GPU: T = 128 .. 8192, 256 experts, top-8, hidden 7168
    python bench/bench_kernels.py --smoke         # CPU: tiny sizes under TRITON_INTERPRET=1 (checks it runs)

For every token count it builds one layer's routing (256 experts on R x S slots with redundant
replicas and one dead rank), then times, each against its torch reference:

* ``map``: :func:`map_mask_record` (logical -> physical + live mask + load record);
* ``scatter``: received rows (bf16, wire order) -> per-expert layout, positions from ``recv_positions``;
* ``gather``: layout -> rows in wire order (combine's send side);
* ``combine``: ``weighted_sum`` over ``[T, K, H]`` pair outputs, bf16 out;
* ``combine+unpermute``: the same from rows in wire order + ``send_plan``'s order (the reference
  first scatters them into a zero ``[T, K, H]``).

The layout is that of a single receiver holding all R x S slots from one source (``[R * S, M, H]``,
M = the largest count), so every row of the plan is moved once. Each time is the median over
``--reps`` runs, after a second of GPU work so clocks are up; each run is timed with CUDA events,
after a write that evicts L2 and behind a GPU sleep that hides the host's launch work, so ``ms`` is
device time (the torch ``map`` still includes the host sync of its boolean indexing). ``host us``
is the median host time to issue one call (torch / Triton), which CUDA-graph replay removes.
GB/s counts the bytes the operation must read and write once (``bytes`` column), for both sides.
Every output is compared bit for bit with the reference; ``fma`` tells whether the reduce would
still match with fp contraction on (it is off in the kernel); the run exits 1 on any mismatch.

**Hot path** (second table; ``--hot-path-only`` prints just it, ``--hot-tokens`` picks the sizes,
default 128,512,4096): the SGLang path's routing for one MoE layer per step, old vs new:

* ``old`` (before issue 14): SGLang's ``dynamic`` logical -> physical map (``randint % num_valid``
  over the map collapsed to one replica per expert) -> the adapter's ``_to_live_replicas`` chain
  (a pair on a dead rank moves to the first live sibling) -> the inner dispatcher's routing kernel
  over an identity table (renormalise, counters, int32 copy);
* ``new``: ONE launch of the routing rule where SGLang maps (``sglang_plugin/routing_hook.py``),
  ids passed straight through by the adapter.

``graph us`` is GPU time per step under CUDA-graph replay (a graph of 20 steps, median over
``--reps`` replays / 20); ``host us`` the median host time to issue one step eagerly (GPU kept busy).
``post us`` is the after-combine launch both paths make per step (nothing lost: it only reads the
slots), under graph replay. ``live`` checks that every routed pair of the new path sits on a live rank and serves its logical
expert (or is -2 exactly when the expert has no live replica), and that the new ids equal the torch
reference of the rule bit for bit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

ROOT = Path(__file__).resolve().parent.parent


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--tokens", help="comma-separated T values (default 128,256,...,8192; 8,33 with --smoke)")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--slots-per-rank", type=int, default=9, help="R * S - E slots hold redundant replicas")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hot-path-only", action="store_true", help="only the SGLang hot-path table")
    ap.add_argument("--hot-tokens", default="128,512,4096", help="T values of the hot-path table")
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = "8,33" if args.smoke else "128,256,512,1024,2048,4096,8192"
    if args.smoke:
        args.experts, args.topk, args.hidden = 16, 4, 256
        args.ranks, args.slots_per_rank, args.reps = 4, 5, 2
        args.hot_tokens = "8,33"
    return args


ARGS = _parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
# dispatch._kernels loads kernels/ as sglang_elastic.kernels from a checkout that was not installed.
from sglang_elastic.dispatch._kernels import kernels as K  # noqa: E402
from sglang_elastic.dispatch.layout import recv_positions, send_plan  # noqa: E402


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        # NaNs compare by being NaN (their payloads may differ by device), everything else by bits.
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        if not torch.equal(na, nb):
            return False
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(ints).masked_fill(na, 0), b.view(ints).masked_fill(nb, 0))
    return torch.equal(a, b)


class Timer:
    """Median device time (ms) and host issue time (us) of a callable; wall clock for both on CPU."""

    SLEEP_CYCLES = 2_000_000  # about 1 ms

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> Tuple[float, float]:
        fn()  # compile / warm up
        host: List[float] = []
        if self.device.type != "cuda":
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(host), statistics.median(host) * 1e3
        torch.cuda.synchronize()
        events = []
        for _ in range(self.reps):
            self.flush.zero_()
            # Keep the GPU busy while the host issues the timed call, so the events time the device
            # work, not Python's launch path (serving replays CUDA graphs).
            torch.cuda._sleep(self.SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events), statistics.median(host)


def make_table(E: int, R: int, S: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """``log2phy [E, X]``: each expert on one random slot, the R * S - E spare slots as extra replicas."""
    if R * S < E:
        raise SystemExit(f"need ranks * slots_per_rank >= experts, got {R} * {S} < {E}")
    slots = torch.randperm(R * S, generator=g)
    owner = torch.cat([torch.arange(E), torch.randint(0, E, (R * S - E,), generator=g)])
    X = int(torch.bincount(owner, minlength=E).max())
    l2p = torch.full((E, X), -1, dtype=torch.int64)
    fill = torch.zeros(E, dtype=torch.int64)
    for slot, e in zip(slots.tolist(), owner.tolist()):
        l2p[e, fill[e]] = slot
        fill[e] += 1
    return l2p.to(device)


def bench_tokens(T: int, l2p: torch.Tensor, live: torch.Tensor, timer: Timer, g: torch.Generator,
                 gd: torch.Generator) -> int:
    """Time and check every operation for ``T`` tokens, print a row each; returns the mismatches."""
    from sglang_elastic.kernels.permute import combine_reduce as combine_kernel

    E, Kk, H, R, S = ARGS.experts, ARGS.topk, ARGS.hidden, ARGS.ranks, ARGS.slots_per_rank
    device, dt = l2p.device, torch.bfloat16
    ids = torch.rand(T, E, generator=g).topk(Kk, dim=1).indices.to(device)
    ids[torch.rand(T, Kk, generator=g).to(device) < 0.01] = -1  # a few unused pairs
    weights = torch.rand(T, Kk, generator=g).to(device)
    load_t = torch.zeros(E, dtype=torch.int64, device=device)
    load_k = torch.zeros(E, dtype=torch.int64, device=device)
    phys_t = K.map_mask_record(ids, l2p, live, S, 4096, load_t, backend="torch")
    phys_k = K.map_mask_record(ids, l2p, live, S, 4096, load_k, backend="triton")
    map_exact = _bits_equal(phys_t, phys_k) and _bits_equal(load_t, load_k)  # before timing adds to load
    plan = send_plan(phys_t, R, S)
    counts = plan.counts.reshape(1, R * S)
    M = max(int(counts.max()), 1)
    pos, _ = recv_positions(counts, M)
    N = pos.numel()
    rows = torch.randn(N, H, generator=gd, device=device).to(dt)
    layout = torch.zeros(R * S, M, H, dtype=dt, device=device)
    layout_k = layout.clone()
    pair_out = torch.randn(T, Kk, H, generator=gd, device=device).to(dt)
    wire = pair_out.view(-1, H)[plan.order]

    # (op, bytes, torch, triton, outputs to compare after both ran, triton with FMA contraction)
    cases = [
        ("map", T * Kk * 16 + l2p.numel() * 8,
         lambda: K.map_mask_record(ids, l2p, live, S, 4096, load_t, backend="torch"),
         lambda: K.map_mask_record(ids, l2p, live, S, 4096, load_k, backend="triton"),
         None, None),
        ("scatter", N * H * 2 * 2 + N * 8,
         lambda: K.scatter_rows(rows, pos, layout, backend="torch"),
         lambda: K.scatter_rows(rows, pos, layout_k, backend="triton"),
         lambda: (layout, layout_k), None),
        ("gather", N * H * 2 * 2 + N * 8,
         lambda: K.gather_rows(layout, pos, backend="torch"),
         lambda: K.gather_rows(layout, pos, backend="triton"),
         None, None),
        ("combine", T * Kk * H * 2 + T * H * 2 + T * Kk * 4,
         lambda: K.combine_reduce(pair_out, weights, dt, backend="torch"),
         lambda: K.combine_reduce(pair_out, weights, dt, backend="triton"),
         None, lambda: combine_kernel(pair_out, weights, dt, fp_fusion=True)),
        ("combine+unpermute", N * H * 2 + T * H * 2 + T * Kk * 4 + N * 8,
         lambda: K.combine_reduce(wire, weights, dt, order=plan.order, backend="torch"),
         lambda: K.combine_reduce(wire, weights, dt, order=plan.order, backend="triton"),
         None, lambda: combine_kernel(wire, weights, dt, order=plan.order, fp_fusion=True)),
    ]
    bad = 0
    for op, nbytes, ref_fn, ker_fn, results, fma_fn in cases:
        ms_t, us_t = timer(ref_fn)
        ms_k, us_k = timer(ker_fn)
        if op == "map":
            exact = map_exact
        else:
            exact = _bits_equal(*(results() if results else (ref_fn(), ker_fn())))
        fma = "-" if fma_fn is None else ("yes" if _bits_equal(ref_fn(), fma_fn()) else "no")
        bad += not exact
        print(f"{T:>6} {op:<18} {nbytes:>10} {ms_t:>9.3f} {ms_k:>9.3f} {nbytes / ms_t / 1e6:>10.1f} "
              f"{nbytes / ms_k / 1e6:>11.1f} {ms_t / ms_k:>6.2f}x {us_t:>6.0f}/{us_k:<6.0f} "
              f"{'yes' if exact else 'NO':>5} {fma:>5}")
    return bad


# ---------------------------------------------------------------------------------------- hot path
def _old_sglang_path(ids, w, l2all, nvalid, siblings, ident, live, S, acc, cum):
    """SGLang 0.5.23 dynamic map -> the adapter's _to_live_replicas (git history) -> inner routing."""
    shape, flat = ids.shape, ids.flatten()
    num_valid = nvalid[flat]
    pick = torch.randint(0, 65536, flat.shape, dtype=torch.int32, device=ids.device) % num_valid
    phys = l2all[flat, pick].to(ids.dtype).view(shape)
    safe = phys.clamp(min=0).long()
    dead = (phys >= 0) & (live[safe // S] == 0)
    cand = siblings[safe]
    ok = (cand >= 0) & (live[cand.clamp(min=0) // S] != 0)
    alt = cand.gather(-1, ok.to(torch.int8).argmax(-1, keepdim=True)).squeeze(-1)
    phys = torch.where(dead & ok.any(-1), alt.to(phys.dtype), phys)
    return K.route_renormalize(phys, w, ident, live, S, 0, None, acc=acc, cum=cum, idx_dtype=torch.int32)


def _graph_us(fn: Callable[[], object], reps: int, steps: int = 20) -> float:
    """Median GPU microseconds per call under CUDA-graph replay (``steps`` calls per graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / steps)
    return statistics.median(times)


def hot_path(device: torch.device, timer: "Timer", g: torch.Generator) -> int:
    """Print the hot-path table (see the module docstring); returns the number of failed checks."""
    from sglang_elastic.eplb.placement import Placement

    E, Kk, R, S = ARGS.experts, ARGS.topk, ARGS.ranks, ARGS.slots_per_rank
    P = R * S
    owner = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
    p2l = owner[torch.randperm(P, generator=g)]
    l2p = Placement(p2l[None], R, E).log2phy[0]                         # [E, X] every replica
    X = l2p.shape[1]
    x_cap = max(1, min(P - E + 1, max(4, X)))                          # as routing_hook sizes its table
    table = torch.full((E, x_cap), -1, dtype=torch.int64)
    table[:, :X] = l2p
    # SGLang's logical_to_all_physical_map with an a2a backend: the nearest replica only (here: the first).
    l2all = l2p[:, :1].contiguous()
    nvalid = torch.ones(E, dtype=torch.int64)
    siblings = l2p[p2l]                                                  # [P, X] the adapter's replica table
    ident = torch.arange(P, dtype=torch.int64)[:, None]
    live = torch.ones(R, dtype=torch.int32)
    live[R - 1] = 0
    table, l2all, nvalid, siblings, ident, live = (t.to(device) for t in (table, l2all, nvalid, siblings, ident, live))
    acc = torch.zeros(3, dtype=torch.int64, device=device)
    cum = torch.zeros(4, dtype=torch.int64, device=device)
    print(f"# hot path: SGLang top-k -> dispatcher routing for one MoE layer; E={E} top-{Kk} on {R} x {S} slots "
          f"(rank {R - 1} dead); ids int32 as SGLang's")
    head = (f"{'T':>6} {'old graph us':>12} {'new graph us':>12} {'old host us':>11} {'new host us':>11} "
            f"{'gpu x':>6} {'host x':>6} {'live':>5} {'post us':>7}")
    print(head)
    print("-" * len(head))
    bad = 0
    for T in (int(x) for x in ARGS.hot_tokens.split(",")):
        ids = torch.rand(T, E, generator=g).topk(Kk, dim=1).indices.to(torch.int32).to(device)
        w = torch.rand(T, Kk, generator=g).to(device)
        out = torch.empty_like(ids)

        def old():
            return _old_sglang_path(ids, w, l2all, nvalid, siblings, ident, live, S, acc, cum)

        def new():
            return K.map_mask_record(ids, table, live, S, 0, None, out=out, dropped_id=-2)

        new()
        ref = K.map_mask_record(ids, table, live, S, 0, None, dropped_id=-2, backend="torch")
        got = out.long()
        on_live = (got < 0) | (live[(got.clamp(min=0) // S)] != 0)
        serves = (got < 0) | (torch.as_tensor(p2l, device=device)[got.clamp(min=0)] == ids.long())
        no_replica = (live[(table[ids.long()].clamp(min=0) // S)] * (table[ids.long()] >= 0)).sum(-1) == 0
        ok = bool(torch.equal(got, ref) and on_live.all() and serves.all() and torch.equal(got == -2, no_replica))
        bad += not ok
        _, host_old = timer(old)
        _, host_new = timer(new)
        # The after-combine launch both paths make (nothing lost: its programs exit after the slots).
        y = torch.randn(T, ARGS.hidden, generator=g).to(torch.bfloat16).to(device)
        no_aff = torch.zeros(T, dtype=torch.bool, device=device)
        flags = torch.zeros(R, dtype=torch.int32, device=device)
        survivors = torch.where(out == -2, torch.full_like(out, -1), out)

        def post():
            K.after_combine(y, survivors, w, no_aff, flags, True, R, S, cum, dropped_id=-2)

        if device.type == "cuda":
            g_old, g_new, g_post = _graph_us(old, ARGS.reps), _graph_us(new, ARGS.reps), _graph_us(post, ARGS.reps)
        else:
            g_old = g_new = g_post = float("nan")
        print(f"{T:>6} {g_old:>12.1f} {g_new:>12.1f} {host_old:>11.0f} {host_new:>11.0f} {g_old / g_new:>5.2f}x "
              f"{host_old / host_new:>5.2f}x {'yes' if ok else 'NO':>5} {g_post:>7.1f}")
    return bad


def main() -> int:
    device = torch.device("cpu" if ARGS.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU interpreter check")
    if not K.triton_available():
        raise SystemExit("Triton is not available (not installed, or no CUDA device and no TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(ARGS.seed)
    gd = torch.Generator(device=device).manual_seed(ARGS.seed)  # big tensors are drawn where they live
    E, Kk, H, R, S = ARGS.experts, ARGS.topk, ARGS.hidden, ARGS.ranks, ARGS.slots_per_rank
    l2p = make_table(E, R, S, device, g)
    live = torch.ones(R, dtype=torch.int32, device=device)
    live[R - 1] = 0  # one dead rank: experts with no other replica map to -1
    timer = Timer(device, ARGS.reps)
    if device.type == "cuda":
        # An idle GPU runs at low clocks for a while: keep it busy ~1 s so the small sizes are not
        # timed during the ramp-up.
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            timer.flush.add_(1)
            torch.cuda.synchronize()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print(f"# {name}; torch {torch.__version__}; E={E} top-{Kk} H={H} bfloat16; R={R} S={S} (rank {R - 1} dead); "
          f"median of {ARGS.reps}")
    head = (f"{'T':>6} {'op':<18} {'bytes':>10} {'torch ms':>9} {'triton ms':>9} {'torch GB/s':>10} "
            f"{'triton GB/s':>11} {'speedup':>7} {'host us':>13} {'exact':>5} {'fma':>5}")
    if not ARGS.hot_path_only:
        print(head)
        print("-" * len(head))
    bad = 0
    for T in (int(x) for x in ARGS.tokens.split(",")) if not ARGS.hot_path_only else ():
        bad += bench_tokens(T, l2p, live, timer, g, gd)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next size's buffers are larger
    bad += hot_path(device, timer, g)
    print(f"# {'all outputs bit-identical to the torch references' if not bad else f'{bad} MISMATCHES'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

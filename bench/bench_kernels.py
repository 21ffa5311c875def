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
"""
from __future__ import annotations

import argparse
import importlib.util
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
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = "8,33" if args.smoke else "128,256,512,1024,2048,4096,8192"
    if args.smoke:
        args.experts, args.topk, args.hidden = 16, 4, 256
        args.ranks, args.slots_per_rank, args.reps = 4, 5, 2
    return args


ARGS = _parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("sglang_elastic.kernels") is None:
    # Source checkout without `pip install -e .`: kernels/ is the subpackage sglang_elastic.kernels.
    import sglang_elastic  # noqa: E402

    _spec = importlib.util.spec_from_file_location("sglang_elastic.kernels", ROOT / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(ROOT / "kernels")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["sglang_elastic.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    sglang_elastic.kernels = _mod

from sglang_elastic import kernels as K  # noqa: E402
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
    print(head)
    print("-" * len(head))
    bad = 0
    for T in (int(x) for x in ARGS.tokens.split(",")):
        bad += bench_tokens(T, l2p, live, timer, g, gd)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next size's buffers are larger
    print(f"# {'all outputs bit-identical to the torch references' if not bad else f'{bad} MISMATCHES'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

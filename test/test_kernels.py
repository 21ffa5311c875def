"""sglang_elastic.kernels: the Triton kernels agree bit for bit with the torch references.

The Triton checks run on CPU under ``TRITON_INTERPRET=1``. That variable is read when Triton is
first imported, and other tests in this process may import Triton first, so all interpreted checks
run in ONE subprocess (this file run as a script, below ``__main__``) that reports each case's
outcome as JSON; the parametrized tests here only look their case up. With a CUDA device, the same
cases also run compiled, in process. The torch fallback (and importing without Triton) is tested
here and in a subprocess that hides Triton.

References: ``dispatch.routing.route`` (map step and load), ``recv_positions`` + plain indexing
(scatter / gather), ``dispatch.layout.weighted_sum`` (combine).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from sglang_elastic import kernels as K
from sglang_elastic.dispatch.layout import recv_positions, send_plan, weighted_sum
from sglang_elastic.dispatch.routing import RoutingTable, route

TOKENS = (1, 7, 64, 300)
TOPK = (1, 2, 4, 8)
N_RANDOM = 6  # extra cases with every parameter drawn at random
MARK = "KERNEL-RESULTS "
HAVE_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------- case builders

def _rand(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform int in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaNs only need to be NaN in both: payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        if not torch.equal(na, nb):
            return False
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(ints).masked_fill(na, 0), b.view(ints).masked_fill(nb, 0))
    return torch.equal(a, b)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def check_map(seed: int, T: int, Kk: int, device: str, backend: str) -> None:
    """map_mask_record vs route(): random placement (replicas, -1 padding anywhere), dead ranks, -1 ids."""
    g = torch.Generator().manual_seed(seed)
    E, R, S, X = _rand(g, 1, 64), _rand(g, 1, 8), _rand(g, 1, 9), _rand(g, 1, 5)
    l2p = torch.full((E, X), -1, dtype=torch.int64)
    for e in range(E):
        n = _rand(g, 0 if seed % 3 == 0 else 1, min(X, R * S))  # sometimes experts with no replica at all
        cols = torch.randperm(X, generator=g)[:n] if seed % 2 else torch.arange(n)  # padding between slots too
        l2p[e, cols] = torch.randperm(R * S, generator=g)[:n]
    live = torch.rand(R, generator=g) < 0.7
    live = [live, live.to(torch.int32), live.to(torch.int64)][seed % 3]
    ids = torch.randint(-1, E, (T, Kk), generator=g).to([torch.int64, torch.int32][seed % 2])
    offset = _rand(g, 0, 10 ** 6) if seed % 5 else -_rand(g, 1, 1000)  # negative: floor modulo must hold
    load0 = torch.randint(0, 100, (E,), generator=g)

    table = RoutingTable(l2p[None].to(device), R, S)
    load_ref = load0.clone().to(device)
    ref = route(ids.to(device), torch.ones(T, Kk, device=device), table, 0, live.to(device), token_offset=offset,
                load=load_ref).phys
    load = load0.clone().to(device)
    phys = K.map_mask_record(ids.to(device), l2p.to(device), live.to(device), S, offset, load, backend=backend)
    _check(_bits_equal(phys, ref), f"phys differs at {(phys.cpu() != ref.cpu()).nonzero()[:5].tolist()}")
    _check(_bits_equal(load, load_ref), f"load differs: {load.tolist()} vs {load_ref.tolist()}")
    phys2 = K.map_mask_record(ids.to(device), l2p.to(device), live.to(device), S, offset, backend=backend)
    _check(_bits_equal(phys2, ref), "phys differs without load")


ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.float64)


def _plan(g: torch.Generator, T: int, Kk: int) -> Tuple[torch.Tensor, int, int]:
    R, S = _rand(g, 1, 4), _rand(g, 1, 6)
    phys = torch.randint(-1, R * S, (T, Kk), generator=g)
    return phys, R, S


def check_permute(seed: int, T: int, Kk: int, device: str, backend: str) -> None:
    """scatter_rows / gather_rows vs indexing, positions from recv_positions, any dtype and row width."""
    g = torch.Generator().manual_seed(seed)
    phys, R, S = _plan(g, T, Kk)
    counts = send_plan(phys, R, S).counts
    M = max(int(counts.max()), 1) + _rand(g, 0, 2)
    pos, _ = recv_positions(counts, M)
    N = pos.numel()
    dtype = ROW_DTYPES[seed % len(ROW_DTYPES)]
    H = (1, 3, 64, 130)[_rand(g, 0, 3)]
    rows = (torch.randn(N, H, generator=g) * 8).to(dtype)
    out_ref = (torch.randn(S * R * M, H, generator=g) * 8).to(dtype).view(S, R * M, H)
    out = out_ref.clone().to(device)
    out_ref.view(-1, H)[pos] = rows
    res = K.scatter_rows(rows.to(device), pos.to(device), out, backend=backend)
    _check(res is out, "scatter_rows must return out")
    _check(_bits_equal(out, out_ref), f"scatter differs ({dtype}, H={H}, N={N})")
    back = K.gather_rows(out, pos.to(device), backend=backend)
    _check(_bits_equal(back, rows), f"gather differs ({dtype}, H={H}, N={N})")
    idx = torch.randint(0, S * R * M, (_rand(g, 0, 50),), generator=g).to(torch.int32)  # repeats, int32
    _check(_bits_equal(K.gather_rows(out, idx.to(device), backend=backend), out_ref.view(-1, H)[idx.long()]),
           "gather with repeated int32 indices differs")


def check_combine(seed: int, T: int, Kk: int, device: str, backend: str) -> None:
    """combine_reduce vs weighted_sum, from [T, K, H] and from wire-order rows + send_plan order."""
    g = torch.Generator().manual_seed(seed)
    H = _rand(g, 1, 200)
    in_dtype = (torch.float32, torch.bfloat16, torch.float16)[seed % 3]
    out_dtype = (torch.bfloat16, torch.float32, torch.float16)[(seed // 3) % 3]
    y = (torch.randn(T, Kk, H, generator=g) * 4).to(in_dtype)
    w = torch.rand(T, Kk, generator=g)
    w[torch.rand(T, Kk, generator=g) < 0.2] = 0.0
    if seed % 4 == 0:  # non-finite values must propagate the same way
        y.view(-1)[torch.randint(0, y.numel(), (3,), generator=g)] = float("nan")
        w.view(-1)[torch.randint(0, w.numel(), (1,), generator=g)] = float("inf")
    w = w.to((torch.float32, torch.bfloat16)[seed % 2])
    ref = weighted_sum(y, w, out_dtype)
    got = K.combine_reduce(y.to(device), w.to(device), out_dtype, backend=backend)
    _check(_bits_equal(got, ref), f"combine differs ({in_dtype}->{out_dtype}, H={H}): max |d| = "
           f"{(got.cpu().float() - ref.float()).abs().nan_to_num(0).max().item()}")

    phys, R, S = _plan(g, T, Kk)
    plan = send_plan(phys, R, S)
    wire = y.view(-1, H)[plan.order]
    full = torch.zeros(T * Kk, H, dtype=in_dtype)
    full[plan.order] = wire
    ref2 = weighted_sum(full.view(T, Kk, H), w, out_dtype)
    got2 = K.combine_reduce(wire.to(device), w.to(device), out_dtype, order=plan.order.to(device), backend=backend)
    _check(_bits_equal(got2, ref2), f"combine from wire order differs ({in_dtype}->{out_dtype}, H={H})")


def check_empty(seed: int, T: int, Kk: int, device: str, backend: str) -> None:
    """Zero tokens / zero rows go through without launching anything."""
    l2p = torch.tensor([[0, 1], [2, -1]], device=device)
    live = torch.ones(2, dtype=torch.bool, device=device)
    phys = K.map_mask_record(torch.empty(0, 4, dtype=torch.int64, device=device), l2p, live, 2, backend=backend)
    _check(phys.shape == (0, 4) and phys.dtype == torch.int64, "empty map")
    out = torch.zeros(4, 8, device=device)
    e = torch.empty(0, dtype=torch.int64, device=device)
    K.scatter_rows(torch.empty(0, 8, device=device), e, out, backend=backend)
    _check(K.gather_rows(out, e, backend=backend).shape == (0, 8), "empty gather")
    _check(K.combine_reduce(torch.empty(0, 2, 8, device=device), torch.empty(0, 2, device=device), torch.float32,
                            backend=backend).shape == (0, 8), "empty combine")


CHECKS: Dict[str, Callable[[int, int, int, str, str], None]] = {
    "map": check_map, "permute": check_permute, "combine": check_combine}


def cases() -> List[Tuple[str, int, int, int]]:
    """``(check, seed, T, K)``: the T x K sweep for each check, then fully random ones, then edge cases."""
    out = []
    for name in CHECKS:
        seed = 0
        for T in TOKENS:
            for Kk in TOPK:
                out.append((name, seed, T, Kk))
                seed += 1
        g = torch.Generator().manual_seed(1234)
        for i in range(N_RANDOM):
            out.append((name, 100 + i, TOKENS[_rand(g, 0, 3)], TOPK[_rand(g, 0, 3)]))
    out.append(("empty", 0, 0, 0))
    return out


CASES = cases()
CHECKS["empty"] = check_empty


def case_id(case: Tuple[str, int, int, int]) -> str:
    return "{}-s{}-T{}-K{}".format(*case)


def run_cases(device: str, backend: str) -> Dict[str, Optional[str]]:
    """Every case's outcome: ``None`` if it passed, else the error (with traceback)."""
    results: Dict[str, Optional[str]] = {}
    for case in CASES:
        name, seed, T, Kk = case
        try:
            CHECKS[name](seed, T, Kk, device, backend)
            results[case_id(case)] = None
        except Exception:  # report every failure, not just the first
            results[case_id(case)] = traceback.format_exc()
    return results


# ------------------------------------------------------------------------- interpreted (subprocess)

def _subprocess_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def interpreted() -> Dict[str, Optional[str]]:
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret"], capture_output=True,
                          text=True, timeout=300, env=_subprocess_env(TRITON_INTERPRET="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(MARK):])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_interpreted_matches_reference(interpreted, case):
    err = interpreted[case_id(case)]
    assert err is None, err


def test_interpreted_auto_backend_uses_triton(interpreted):
    assert interpreted["auto-is-triton"] is None, interpreted["auto-is-triton"]


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs Triton and a CUDA device")
def test_triton_compiled_matches_reference():
    if K._interpret():
        pytest.skip("TRITON_INTERPRET is set in this process")
    failed = {k: v for k, v in run_cases("cuda", "triton").items() if v is not None}
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


# ------------------------------------------------------------------------------------ torch fallback

@pytest.mark.parametrize("name", sorted(CHECKS))
def test_torch_backend_matches_reference(name):
    for case in CASES:
        if case[0] == name and case[2] in (0, 1, 64):  # a subset: the torch path is the reference's own code
            CHECKS[name](case[1], case[2], case[3], "cpu", "torch")


def test_bad_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        K.gather_rows(torch.zeros(2, 2), torch.zeros(1, dtype=torch.int64), backend="cuda")


_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from sglang_elastic import kernels as K
assert not K.triton_available()
assert "triton" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
ids = torch.tensor([[0, 1], [1, -1]])
phys = K.map_mask_record(ids, torch.tensor([[0, 2], [1, -1]]), torch.tensor([1, 0]), 2, 0)
assert phys.tolist() == [[0, 1], [1, -1]], phys
out = K.scatter_rows(torch.ones(1, 3), torch.tensor([2]), torch.zeros(4, 3))
assert out[2].tolist() == [1.0, 1.0, 1.0] and out.sum() == 3
assert K.gather_rows(out, torch.tensor([2, 0])).tolist() == [[1.0] * 3, [0.0] * 3]
y = torch.ones(2, 2, 3)
w = torch.tensor([[0.5, 0.25], [1.0, 0.0]])
assert K.combine_reduce(y, w, torch.float32).tolist() == [[0.75] * 3, [1.0] * 3]
try:
    K.gather_rows(out, torch.tensor([0]), backend="triton")
except ImportError:
    pass
else:
    raise AssertionError("backend='triton' without Triton must raise ImportError")
print("ok")
"""


def test_fallback_without_triton():
    """The package imports and every wrapper works (torch) when Triton cannot be imported."""
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env(TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_triton_available_needs_cuda_or_interpreter():
    code = ("from sglang_elastic import kernels as K; import torch; "
            "print(K.triton_available(), torch.cuda.is_available())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    available, cuda = proc.stdout.split()
    assert available == cuda == "False"  # CUDA_VISIBLE_DEVICES="" hides any GPU


# ---------------------------------------------------------------------------------------- script

def _interpreted_main() -> int:
    if not K._interpret():
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    results = run_cases("cpu", "triton")
    try:
        # "auto" must pick Triton here (interpreter, CPU tensors) and give the same results.
        _check(K.triton_available() and K._use_triton("auto", torch.zeros(1)), "auto does not pick Triton")
        check_map(7, 64, 8, "cpu", "auto")
        check_combine(7, 7, 4, "cpu", "auto")
        # An out dtype the kernel lacks goes to torch under "auto", and is refused under "triton".
        y, w = torch.randn(5, 2, 8), torch.rand(5, 2)
        fp8 = torch.float8_e4m3fn
        _check(_bits_equal(K.combine_reduce(y, w, fp8), weighted_sum(y, w, fp8)), "fp8 out under auto")
        try:
            K.combine_reduce(y, w, fp8, backend="triton")
            raise AssertionError("fp8 out accepted by the Triton combine")
        except ValueError:
            pass
        results["auto-is-triton"] = None
    except Exception:
        results["auto-is-triton"] = traceback.format_exc()
    print(MARK + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(_interpreted_main() if "--interpret" in sys.argv else 2)

"""sglang_elastic.transport on real processes over 127.0.0.1, for every backend.

A cluster is N worker processes driven by command queues; each worker owns one transport and a
few registered tensors whose contents are a deterministic function of (rank, seed), so the test
process knows every byte everywhere and checks each execute exactly. The store is a TCPStore
served by the test process itself (as the orchestrator would), never by a rank.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import random
import signal
import sys
import time
import traceback

import pytest
import torch

from sglang_elastic.transport import KINDS, Copy, PeerFailure, make_transport, slack_s

TIMEOUT = 3.0  # execute timeout in the failure scenarios
DEADLINE = TIMEOUT + slack_s(TIMEOUT) + 8.0  # generous bound on detection time (2 loaded cores)
NAMES = ("a", "b")  # 64-byte rows; "c" has 6-byte rows (row-size mismatch)


def rows_of(rank: int, name: str) -> int:
    return {"a": 6 + rank % 3, "b": 4 + (2 * rank) % 5, "c": 3}[name]


def make_tensors(rank: int, seed: int, device=None) -> dict:
    """With a (cuda) device, "a" and "c" live there and "b" stays in host memory: mixed copies."""
    g = torch.Generator().manual_seed(seed * 1009 + rank * 31 + 7)
    out = {
        "a": torch.randn(rows_of(rank, "a"), 16, generator=g),  # float32, 64 B/row
        "b": torch.randn(rows_of(rank, "b"), 2, 4, generator=g, dtype=torch.float64),  # 64 B/row
        "c": torch.randint(-100, 100, (rows_of(rank, "c"), 3), generator=g, dtype=torch.int16),  # 6 B/row
    }
    if device is not None:
        out["a"], out["c"] = out["a"].to(device), out["c"].to(device)
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().reshape(t.shape[0], -1).view(torch.uint8)


def expected_after(state: dict, copies) -> dict:
    """state: {(rank, name): byte tensor}; every copy reads the pre-execute value."""
    new = {k: v.clone() for k, v in state.items()}
    for c in copies:
        new[(c.dst, c.dst_name)][c.dst_row] = state[(c.src, c.src_name)][c.src_row]
    return new


def random_plan(rng: random.Random, ranks, n: int, only_sender=None):
    """Many-to-many copies with local copies, a swap, and (optionally) a rank that only sends."""
    ranks = sorted(ranks)
    dsts = [r for r in ranks if r != only_sender]
    used = set()
    out = []

    def add(src, dst, sn, sr, dn, dr):
        if (dst, dn, dr) in used:
            return
        used.add((dst, dn, dr))
        out.append(Copy(src, dst, sn, sr, dn, dr))

    a, b = dsts[0], dsts[1]
    add(a, b, "a", 0, "a", 0)  # a swap: both rows are source and destination
    add(b, a, "a", 0, "a", 0)
    for r in dsts:  # local copies, one of them a cycle with a remote read
        add(r, r, "b", 1, "a", 1)
    if only_sender is not None:
        add(only_sender, a, "a", 2, "b", 0)
    while len(out) < n:
        src, dst = rng.choice(ranks), rng.choice(dsts)
        sn, dn = rng.choice(NAMES), rng.choice(NAMES)
        add(src, dst, sn, rng.randrange(rows_of(src, sn)), dn, rng.randrange(rows_of(dst, dn)))
    rng.shuffle(out)
    return out


def _counts() -> dict:
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}


def _worker(kind: str, rank: int, port: int, cmds, results, device=None) -> None:
    """One rank: owns a transport; runs commands until 'quit'."""
    try:
        if device == "cuda":
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                           timeout=datetime.timedelta(seconds=60))
        t = make_transport(kind, rank, store, connect_timeout_s=30, device=device or "cpu")
        tensors = None
        results.put((rank, "up", {"pid": os.getpid(), "inc": t.incarnation}))
        while True:
            cmd, arg = cmds.get()
            t0 = time.monotonic()
            try:
                if cmd == "quit":
                    t.close()
                    results.put((rank, "ok", None))
                    return
                if cmd == "fill":  # first time: register; later: overwrite in place
                    fresh = make_tensors(rank, arg, device)
                    if tensors is None:
                        tensors = fresh
                        for name, x in tensors.items():
                            t.register(name, x)
                    else:
                        for name, x in tensors.items():
                            x.copy_(fresh[name])
                    out = None
                elif cmd == "regrow":  # register tensor `arg` again with twice the rows (a new buffer)
                    tensors[arg] = torch.cat([tensors[arg], tensors[arg]]).contiguous()
                    t.register(arg, tensors[arg])
                    out = None
                elif cmd == "set_peers":
                    t.set_peers(arg)
                    out = None
                elif cmd == "unregister":  # withdraw tensor `arg` (its buffer is dropped)
                    t.unregister(arg)
                    tensors[arg] = None
                    out = None
                elif cmd == "register_late":  # (name, seconds): register a fresh buffer that long from now
                    name, delay = arg
                    time.sleep(delay)
                    tensors[name] = make_tensors(rank, 7, device)[name]
                    t.register(name, tensors[name])
                    out = None
                elif cmd == "exec":
                    copies, timeout, die = arg
                    if die == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif die == "stop":
                        os.kill(os.getpid(), signal.SIGSTOP)
                    t0 = time.monotonic()
                    t.execute(copies, timeout)
                    # Copies: pickling a tensor through a multiprocessing queue moves its storage to
                    # shared memory, which would pull registered memory from under the transport.
                    out = {"dt": time.monotonic() - t0,
                           "tensors": {n: x.to("cpu", copy=True) for n, x in tensors.items() if x is not None}}
                elif cmd == "counts":
                    out = _counts()
                else:
                    raise ValueError(f"unknown command {cmd}")
                results.put((rank, "ok", out))
            except PeerFailure as exc:
                results.put((rank, "peerfail", {"rank": exc.rank, "ranks": list(exc.ranks),
                                                "dt": time.monotonic() - t0, "msg": str(exc)}))
            except ValueError as exc:
                results.put((rank, "valueerror", {"msg": str(exc), "dt": time.monotonic() - t0}))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "sglang_elastic.transport",
                                "sglang_elastic.transport.torch_backend"])
    return ctx


class Cluster:
    """Worker processes of one backend, a TCPStore served here, and the bytes each rank holds."""

    def __init__(self, kind: str, ranks, device=None) -> None:
        self.kind = kind
        self.device = device
        self.ctx = _context()
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                                timeout=datetime.timedelta(seconds=60))
        self.port = self.store.port
        self.results = self.ctx.Queue()
        self.procs: dict = {}
        self.cmds: dict = {}
        self.stash: list = []
        self.state: dict = {}  # (rank, name) -> expected bytes
        try:
            for r in ranks:
                self.start(r)
            self.collect(ranks, "up")
        except BaseException:
            self.close()
            raise

    def start(self, rank: int) -> None:
        q = self.ctx.Queue()
        p = self.ctx.Process(target=_worker, args=(self.kind, rank, self.port, q, self.results, self.device),
                             daemon=True)
        p.start()
        self.procs[rank], self.cmds[rank] = p, q

    def send(self, ranks, cmd, arg=None) -> None:
        for r in ranks:
            self.cmds[r].put((cmd, arg))

    def collect(self, ranks, want="ok", timeout: float = 90.0) -> dict:
        """Wait for one result from each of ``ranks``; status must be ``want`` unless want is None."""
        got: dict = {}
        end = time.monotonic() + timeout
        keep = []
        for item in self.stash:
            if item[0] in ranks and item[0] not in got:
                got[item[0]] = item
            else:
                keep.append(item)
        self.stash = keep
        while len(got) < len(ranks):
            try:
                item = self.results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(ranks) - set(got))
                raise AssertionError(f"{self.kind}: no result from rank(s) {missing} within {timeout}s") from None
            if item[1] == "error":
                raise AssertionError(f"{self.kind}: rank {item[0]} crashed:\n{item[2]}")
            if item[0] in ranks and item[0] not in got:
                got[item[0]] = item
            else:
                self.stash.append(item)
        for r, (_, status, payload) in got.items():
            if want is not None:
                assert status == want, f"{self.kind}: rank {r} answered {status}: {payload}"
        return {r: (status, payload) for r, (_, status, payload) in got.items()}

    def run(self, ranks, cmd, arg=None, want="ok", timeout: float = 90.0) -> dict:
        self.send(ranks, cmd, arg)
        return self.collect(ranks, want, timeout)

    def fill(self, ranks, seed: int) -> None:
        self.run(ranks, "fill", seed)
        for r in ranks:
            for name, x in make_tensors(r, seed).items():
                self.state[(r, name)] = as_bytes(x).clone()

    def exec_exact(self, ranks, copies, timeout: float = 30.0) -> None:
        """Execute on ``ranks`` and check every tensor of every rank byte for byte."""
        res = self.run(ranks, "exec", (copies, timeout, None))
        expect = expected_after({k: v for k, v in self.state.items() if k[0] in ranks}, copies)
        for r in ranks:
            for name, x in res[r][1]["tensors"].items():
                assert torch.equal(as_bytes(x), expect[(r, name)]), f"{self.kind}: rank {r} tensor {name!r} differs"
        self.state.update(expect)

    def kill(self, rank: int) -> None:
        p = self.procs.get(rank)
        if p is not None and p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        if p is not None:
            p.join(10)

    def close(self) -> None:
        for r, p in list(self.procs.items()):
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            p.join(10)
        self.procs.clear()


def _require(kind: str) -> None:
    mod = {"torch": "torch.distributed", "nixl": "nixl._api", "mooncake": "mooncake.engine"}[kind]
    try:
        __import__(mod)
    except Exception as exc:
        pytest.fail(f"transport library for {kind!r} is missing ({exc}); run bash .ci/setup --test")


def _check_failures(res: dict, victim: int, kind: str) -> None:
    for r, (status, p) in res.items():
        assert status == "peerfail", f"{kind}: survivor {r} answered {status}: {p}"
        assert p["rank"] == victim, f"{kind}: survivor {r} blamed rank {p['rank']} instead of {victim}: {p['msg']}"
        assert p["dt"] < DEADLINE, f"{kind}: survivor {r} took {p['dt']:.1f}s to notice (deadline {DEADLINE:.0f}s)"


# ----------------------------------------------------------------------------- in-process checks
def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="torch, nixl, mooncake"):
        make_transport("carrier-pigeon", 0, None)


@pytest.mark.parametrize("kind,module,package", [("nixl", "nixl._api", "nixl-cu12"),
                                                 ("mooncake", "mooncake.engine", "mooncake-transfer-engine")])
def test_missing_library_names_the_package(monkeypatch, kind, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=package):
        make_transport(kind, 0, None)


def test_a_nixl_agent_that_cannot_be_loaded_is_a_peer_failure():
    """NIXL refusing a peer's metadata (NIXL_ERR_BACKEND when its UCX worker is gone, here a torn
    blob) is a PeerFailure naming that peer, which the callers' failure paths handle; it used to
    escape set_peers and crash the rank (6-rank nixl soak, seed 103)."""
    _require("nixl")
    import subprocess

    code = (
        "import os\n"
        "from sglang_elastic.transport.nixl_endpoint import NixlEndpoint\n"
        "from sglang_elastic.transport.base import PeerFailure\n"
        "a, b = NixlEndpoint('t', 0, 1), NixlEndpoint('t', 1, 1)\n"
        "blob = b.metadata()['agent']\n"
        "try:\n"
        "    a.connect(1, {'agent': blob[:len(blob) // 2], 'agent_name': 't-r1'}, 1)\n"
        "except PeerFailure as exc:\n"
        "    print('PeerFailure', exc.rank, exc, flush=True)\n"
        "a.connect(1, b.metadata(), 1)\n"  # the whole blob still loads afterwards
        "print('connected', a.peers, flush=True)\n"
        "os._exit(0)\n"  # NIXL's agent crashes at interpreter exit
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("PeerFailure", "connected"))]
    assert lines[0].startswith("PeerFailure 1 ") and "could not load rank 1's agent 't-r1'" in lines[0], p.stdout + p.stderr
    assert lines[1] == "connected (1,)", p.stdout + p.stderr


def test_a_transfer_nixl_refuses_for_a_loaded_peer_loads_its_agent_again():
    """NIXL refusing to create a transfer to a connected peer (its copy of the peer went bad; here
    the agent is dropped behind the endpoint's back) reloads the peer's agent once and creates the
    transfer; the bytes arrive. (A 6-rank nixl soak, seed 115: a joined rank's reads from rank 1
    failed with NIXL_ERR_NOT_FOUND on every retry while rank 1 served everyone else.)"""
    _require("nixl")
    import subprocess

    code = (
        "import os, time, numpy as np\n"
        "from sglang_elastic.transport.nixl_endpoint import NixlEndpoint\n"
        "a, b = NixlEndpoint('t', 0, 1), NixlEndpoint('t', 1, 1)\n"
        "src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, np.uint8)\n"
        "a.register(src.ctypes.data, src.nbytes); b.register(dst.ctypes.data, dst.nbytes)\n"
        "a.connect(1, b.metadata(), 1)\n"
        "a.agent.remove_remote_agent(a._peers[1])\n"
        "h, st = a.transfer('WRITE', 1, [(src.ctypes.data, 4096, 0)], [(dst.ctypes.data, 4096, 0)])\n"
        "end = time.monotonic() + 60\n"
        "while st == 'PROC' and time.monotonic() < end:\n"
        "    st = a.state(h)\n"
        "    b.notifications()\n"  # progresses the receiving agent (one process: nobody else does)
        "print('state', st, bool((dst == src).all()), flush=True)\n"
        "os._exit(0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "state DONE True" in p.stdout, p.stdout + p.stderr
    assert "NIXL refused a WRITE to rank 1" in p.stderr and "loading its agent again" in p.stderr, p.stderr


def test_peer_failure_survives_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(PeerFailure(3, "gone", ranks=[3, 1])))
    assert isinstance(exc, PeerFailure) and exc.rank == 3 and exc.ranks == [3, 1] and str(exc) == "gone"


def _in_child(fn, *args) -> None:
    """Run ``fn(*args)`` in a fresh process and re-raise its failure here.

    NIXL's agent crashes its process at interpreter exit (a native destructor), even after close();
    keeping the agent out of the pytest process keeps pytest's exit status meaningful. The child
    leaves with os._exit for the same reason.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_main, args=(q, fn, args))
    p.start()
    try:
        status, payload = q.get(timeout=120)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    assert status == "ok", payload


def _child_main(q, fn, args) -> None:
    try:
        fn(*args)
        q.put(("ok", None))
    except BaseException:
        q.put(("error", traceback.format_exc()))
    q.close()
    q.join_thread()
    os._exit(0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_single_rank(kind):
    _require(kind)
    _in_child(_bad_inputs_single_rank, kind)


def _bad_inputs_single_rank(kind):
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=30))
    t = make_transport(kind, 0, store)
    try:
        x = make_tensors(0, 1)
        for n, v in x.items():
            t.register(n, v)
        with pytest.raises(ValueError, match="contiguous"):
            t.register("bad", torch.zeros(4, 4).t())
        t.set_peers([0])
        with pytest.raises(ValueError, match="must include this rank"):
            t.set_peers([1])
        before = {n: v.clone() for n, v in x.items()}
        bad = {
            "no tensor registered": [Copy(0, 0, "a", 0, "b", 0), Copy(0, 0, "nope", 0, "a", 1)],
            "source row 99 out of range": [Copy(0, 0, "a", 99, "a", 0)],
            "destination row -1 out of range": [Copy(0, 0, "a", 0, "a", -1)],
            "row size mismatch": [Copy(0, 0, "a", 0, "c", 0)],
            "not live peers": [Copy(0, 0, "a", 0, "a", 1), Copy(0, 5, "a", 0, "a", 0)],
            "already written": [Copy(0, 0, "a", 0, "b", 0), Copy(0, 0, "a", 1, "b", 0)],
            "expected Copy": [(0, 0, "a", 0, "a", 1)],
        }
        for msg, copies in bad.items():
            with pytest.raises(ValueError, match=msg):
                t.execute(copies, 1.0)
        with pytest.raises(ValueError, match="timeout_s"):
            t.execute([Copy(0, 0, "a", 0, "a", 1)], 0)
        for n in x:
            assert torch.equal(x[n], before[n]), "a rejected execute changed nothing"
        # Local copies (with a cycle) still work, and a rank absent from the list returns at once.
        t.execute([Copy(0, 0, "a", 0, "a", 1), Copy(0, 0, "a", 1, "a", 0), Copy(0, 0, "b", 2, "a", 2)], 1.0)
        assert torch.equal(x["a"][0], before["a"][1]) and torch.equal(x["a"][1], before["a"][0])
        assert torch.equal(as_bytes(x["a"])[2], as_bytes(before["b"])[2])
        t.execute([Copy(1, 2, "a", 0, "a", 0)], 1.0)
        t.execute([], 1.0)
    finally:
        t.close()
        t.close()


# ----------------------------------------------------------------------------- clusters
@pytest.mark.parametrize("kind", KINDS)
def test_random_plans_move_bytes_exactly(kind):
    """4 ranks: random many-to-many plans (local copies, swaps, a send-only rank), then bad inputs
    are refused before any communication and the transport still works."""
    _require(kind)
    ranks = [0, 1, 2, 3]
    c = Cluster(kind, ranks)
    try:
        c.fill(ranks, seed=1)
        c.run(ranks, "set_peers", ranks)
        rng = random.Random(kind)
        for i in range(4):
            c.fill(ranks, seed=10 + i)
            c.exec_exact(ranks, random_plan(rng, ranks, 24, only_sender=3 if i % 2 == 0 else None))
        # A plan among a subset: ranks outside it return at once.
        c.exec_exact(ranks, random_plan(rng, [1, 2], 8))
        # Bad inputs: everyone involved refuses the same list; nothing moves.
        bad = [Copy(0, 1, "nope", 0, "a", 0)]  # rank 1 waits for rank 0's late registration, then gives up
        res = c.run([0, 1], "exec", (bad, 1.0, None), want="valueerror")
        assert "no tensor registered as 'nope'" in res[1][1]["msg"]
        for bad, msg in [([Copy(1, 2, "a", 99, "a", 0)], "source row 99 out of range"),
                         ([Copy(2, 3, "a", 0, "c", 0)], "row size mismatch"),
                         ([Copy(0, 1, "a", 0, "a", 0), Copy(1, 7, "a", 0, "a", 0)], "not live peers")]:
            parts = sorted({x for cp in bad for x in (cp.src, cp.dst) if x in ranks})
            res = c.run(parts, "exec", (bad, 5.0, None), want="valueerror")
            assert all(msg in p["msg"] for _, p in res.values()), res
            assert all(p["dt"] < 2.0 for _, p in res.values()), "refused before any communication"
        c.fill(ranks, seed=99)
        c.exec_exact(ranks, random_plan(rng, ranks, 16))
        c.run(ranks, "quit")
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_mid_execute_then_rejoin(kind):
    """SIGKILL rank 2 as an execute starts: survivors raise PeerFailure(2) in time, carry on among
    themselves after set_peers, then a fresh process rejoins as rank 2 (new incarnation)."""
    _require(kind)
    ranks, victim = [0, 1, 2, 3], 2
    survivors = [r for r in ranks if r != victim]
    c = Cluster(kind, ranks)
    try:
        c.fill(ranks, seed=1)
        c.run(ranks, "set_peers", ranks)
        rng = random.Random(f"kill-{kind}")
        c.exec_exact(ranks, random_plan(rng, ranks, 12))
        c.send(survivors, "exec", (random_plan(rng, ranks, 24), TIMEOUT, None))
        c.send([victim], "exec", ([], TIMEOUT, "kill"))
        _check_failures(c.collect(survivors, want=None), victim, kind)
        c.procs[victim].join(10)
        assert c.procs[victim].exitcode == -signal.SIGKILL
        # Survivors only.
        c.run(survivors, "set_peers", survivors)
        c.fill(survivors, seed=5)
        c.exec_exact(survivors, random_plan(rng, survivors, 16, only_sender=3))
        # Rejoin: a new process as rank 2; its old metadata must not be used.
        c.start(victim)
        up = c.collect([victim], "up")[victim][1]
        assert up["inc"] == 2, "a new incarnation"
        c.fill([victim], seed=6)
        c.run(ranks, "set_peers", ranks)
        c.exec_exact(ranks, random_plan(rng, ranks, 24))
        c.exec_exact(ranks, [Copy(2, r, "a", 0, "b", 1) for r in ranks] + [Copy(0, 2, "b", 0, "a", 3)])
        c.run(ranks, "quit")
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sigstop_peer_is_detected_by_deadline(kind):
    """A frozen rank (SIGSTOP): survivors raise PeerFailure naming it within the deadline."""
    _require(kind)
    ranks, victim = [0, 1, 2, 3], 3
    survivors = [r for r in ranks if r != victim]
    c = Cluster(kind, ranks)
    try:
        c.fill(ranks, seed=1)
        c.run(ranks, "set_peers", ranks)
        rng = random.Random(f"stop-{kind}")
        c.exec_exact(ranks, random_plan(rng, ranks, 12))
        plan = random_plan(rng, ranks, 24)
        c.send(survivors, "exec", (plan, TIMEOUT, None))
        c.send([victim], "exec", (plan, TIMEOUT, "stop"))
        res = c.collect(survivors, want=None, timeout=DEADLINE + 30)
        _check_failures(res, victim, kind)
        assert all(p["dt"] >= TIMEOUT * 0.9 for _, p in res.values()), "a frozen peer is only caught by the deadline"
        c.kill(victim)
        c.run(survivors, "set_peers", survivors)
        c.fill(survivors, seed=3)
        c.exec_exact(survivors, random_plan(rng, survivors, 16))
        c.run(survivors, "quit")
    finally:
        c.close()


# nixl not here: one run of 6 (under two soaks beside it) ended 3+ fds up; not understood yet.
@pytest.mark.parametrize("kind", ["torch", "mooncake"])
def test_ten_fail_rejoin_cycles_leak_nothing(kind):
    """Kill and restart rank 2 ten times: the survivors' thread and fd counts stay put (±2)."""
    _require(kind)
    ranks, victim = [0, 1, 2], 2
    survivors = [0, 1]
    c = Cluster(kind, ranks)
    try:
        c.fill(ranks, seed=1)
        c.run(ranks, "set_peers", ranks)
        rng = random.Random("leak")
        baseline = None
        for cycle in range(11):
            c.send(survivors, "exec", (random_plan(rng, ranks, 8), TIMEOUT, None))
            c.send([victim], "exec", ([], TIMEOUT, "kill"))
            _check_failures(c.collect(survivors, want=None), victim, kind)
            c.procs[victim].join(10)
            c.run(survivors, "set_peers", survivors)
            c.fill(survivors, seed=100 + cycle)
            c.exec_exact(survivors, random_plan(rng, survivors, 6))
            c.start(victim)
            c.collect([victim], "up")
            c.fill([victim], seed=100 + cycle)
            c.run(ranks, "set_peers", ranks)
            c.exec_exact(ranks, random_plan(rng, ranks, 8))
            counts = {r: p for r, (_, p) in c.run(survivors, "counts").items()}
            if cycle == 0:
                baseline = counts  # after one warm-up cycle
        # Mooncake closes its connections to a departed peer in the background (a few ms, the last
        # read ~1 s): the counts settle, the wait ends as soon as they do.
        end = time.monotonic() + 60.0
        while time.monotonic() < end and any(abs(counts[r][w] - baseline[r][w]) > 2
                                             for r in survivors for w in ("threads", "fds")):
            time.sleep(0.5)
            counts = {r: p for r, (_, p) in c.run(survivors, "counts").items()}
        for r in survivors:
            for what in ("threads", "fds"):
                grew = counts[r][what] - baseline[r][what]
                assert abs(grew) <= 2, f"rank {r}: {what} went {baseline[r][what]} -> {counts[r][what]} over 10 cycles"
        c.run(ranks, "quit")
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["torch", "nixl"])
def test_gpu_tensors_move_exactly(kind):
    """CUDA rows (NCCL / NIXL VRAM) mixed with host rows; a frozen then a killed GPU peer are
    reported in time, and a fresh process rejoins in between."""
    need = 2 if kind == "torch" else 1  # NCCL wants one GPU per rank
    if not torch.cuda.is_available() or torch.cuda.device_count() < need:
        pytest.skip(f"needs {need} CUDA device(s)")
    _require(kind)
    ranks = [0, 1]
    c = Cluster(kind, ranks, device="cuda")
    try:
        c.fill(ranks, seed=1)
        c.run(ranks, "set_peers", ranks)
        rng = random.Random(f"gpu-{kind}")
        for i in range(3):
            c.fill(ranks, seed=20 + i)
            c.exec_exact(ranks, random_plan(rng, ranks, 16))
        plan = random_plan(rng, ranks, 16)
        c.send([0], "exec", (plan, TIMEOUT, None))
        c.send([1], "exec", (plan, TIMEOUT, "stop"))
        _check_failures(c.collect([0], want=None, timeout=DEADLINE + 30), 1, kind)
        c.kill(1)
        c.start(1)
        c.collect([1], "up")
        c.fill(ranks, seed=25)
        c.run(ranks, "set_peers", ranks)
        c.exec_exact(ranks, random_plan(rng, ranks, 16))
        c.send([0], "exec", (random_plan(rng, ranks, 16), TIMEOUT, None))
        c.send([1], "exec", ([], TIMEOUT, "kill"))
        _check_failures(c.collect([0], want=None), 1, kind)
        c.run([0], "set_peers", [0])
        c.fill([0], seed=30)
        c.exec_exact([0], [Copy(0, 0, "a", 0, "a", 1), Copy(0, 0, "a", 1, "a", 0), Copy(0, 0, "b", 2, "a", 2)])
        c.run([0], "quit")
    finally:
        c.close()


def test_peer_registering_a_name_again_with_more_rows():
    """Regression: a peer re-registered a tensor with more rows after we cached its metadata; a copy
    into one of the new rows must go through (it used to be refused on one side, and the other side
    then declared a healthy peer dead)."""
    ranks = [0, 1]
    c = Cluster("torch", ranks)
    try:
        c.fill(ranks, seed=3)
        c.run(ranks, "set_peers", ranks)
        c.exec_exact(ranks, [Copy(0, 1, "a", 0, "a", 0)])  # both sides now cache each other's metadata
        c.run(ranks, "regrow", "a")
        row = rows_of(1, "a") + 1                             # exists only in the regrown tensor
        res = c.run(ranks, "exec", ([Copy(0, 1, "a", 1, "a", row)], 10.0, None))
        got = res[1][1]["tensors"]["a"]
        src = res[0][1]["tensors"]["a"]
        assert torch.equal(as_bytes(got)[row], as_bytes(src)[1])
        c.run(ranks, "quit")
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_into_a_peer_s_unregistered_tensor_waits_for_its_registration(kind):
    """A buffer withdrawn with ``unregister`` (background staging, freed after an update) and
    registered again later: a peer that validates a copy list naming it meanwhile waits for the
    registration, as for a name never registered, and the copy lands in the new buffer (a stand-in
    kept registered would have made it refuse the list at once: the soak's stale-staging race)."""
    ranks = [0, 1]
    c = Cluster(kind, ranks)
    try:
        c.fill(ranks, seed=3)
        c.run(ranks, "set_peers", ranks)
        c.exec_exact(ranks, [Copy(0, 1, "a", 0, "a", 0)])  # both sides now cache each other's metadata
        c.run([1], "unregister", "a")
        copies = [Copy(0, 1, "a", 1, "a", 2)]
        c.send([0], "exec", (copies, 30.0, None))           # rank 0 validates while "a" is gone on rank 1
        c.run([1], "register_late", ("a", 0.5))
        res1 = c.run([1], "exec", (copies, 30.0, None))
        res0 = c.collect([0], "ok", 60)
        assert torch.equal(as_bytes(res1[1][1]["tensors"]["a"])[2], as_bytes(res0[0][1]["tensors"]["a"])[1])
        c.run(ranks, "quit")
    finally:
        c.close()

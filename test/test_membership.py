"""sglang_elastic.membership on real processes over 127.0.0.1.

The test process plays the orchestrator: it runs the MembershipServer (the TCPStore lives there,
never in a rank). Ranks are child processes (forkserver, torch preloaded) driven over pipes; each
binds its own ElasticEPStateManager to its MembershipClient, so the tests also check that every
rank's state holds the agreed live set and epoch. Timings are never asserted, only that things
happened before generous deadlines.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from typing import Dict, List, Optional

import pytest
import torch.distributed as dist

from sglang_elastic.membership import (
    MembershipClient,
    MembershipError,
    MembershipServer,
    MembershipTimeout,
    MembershipView,
)
from sglang_elastic.state import ElasticEPState

HOST = "127.0.0.1"
HB = 0.1          # heartbeat interval of the ranks
TIMEOUT = 1.0     # server heartbeat timeout
DEADLINE = 30.0   # generous bound for anything to be observed (2 loaded cores)
MAX_RANKS = 8

_CTX = None


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "sglang_elastic.membership",
                                     "sglang_elastic.state"])
    return _CTX


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """Rank processes are killed by each test; the forkserver that forked them goes at the end."""
    yield
    if _CTX is not None:
        from multiprocessing import forkserver

        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()


# ---------------------------------------------------------------------------------------- ranks
def _report(client: MembershipClient, state: ElasticEPState, view: MembershipView) -> dict:
    return {
        "rank": client.rank, "epoch": view.epoch, "live": list(view.live),
        "incarnations": {int(k): v for k, v in view.incarnations.items()},
        "status": client.status, "inc": client.incarnation,
        "state_live": state.live_ranks(), "state_epoch": state.epoch,
        "state_membership_epoch": state.membership_epoch,
        "dead": sorted(client.liveness.dead()),
    }


def _pred(spec: dict):
    def pred(v: MembershipView) -> bool:
        if spec.get("live") is not None and list(v.live) != spec["live"]:
            return False
        if spec.get("min_epoch") is not None and v.epoch < spec["min_epoch"]:
            return False
        for r, inc in (spec.get("inc") or {}).items():
            if v.incarnations.get(int(r)) != inc:
                return False
        return True
    return pred


def _rank_main(conn, port: int, rank: int) -> None:
    """A rank: joins, binds its state manager, then serves commands until told to exit."""
    from sglang_elastic.state import ElasticEPStateManager

    client = None
    try:
        state = ElasticEPStateManager.init(ep_size=1, max_ep_size=MAX_RANKS, device="cpu")
        client = MembershipClient(HOST, port, rank, HB, connect_timeout_s=DEADLINE)
        client.bind_state(ElasticEPStateManager)
        view = client.join(timeout=DEADLINE)
        conn.send(("ok", _report(client, state, view)))
        while True:
            cmd, arg = conn.recv()
            try:
                if cmd == "exit":
                    break
                if cmd == "status":
                    out = _report(client, state, client.current())
                elif cmd == "wait":
                    out = _report(client, state, client.wait_for_epoch(_pred(arg), DEADLINE))
                elif cmd == "join":
                    out = _report(client, state, client.join(timeout=DEADLINE))
                elif cmd == "report_dead":
                    client.report_dead(arg, "test report")
                    out = None
                elif cmd == "wait_dead":  # a Liveness wait far beyond the test's limit
                    lv = client.liveness
                    while True:
                        seen = lv.version
                        if lv.is_dead(arg):
                            break
                        lv.wait(3600, since_version=seen)
                    out = lv.reason(arg)
                elif cmd == "wait_gone":  # an epoch wait far beyond the test's limit
                    out = _report(client, state, client.wait_for_epoch(lambda v: arg not in v.live, 3600))
                elif cmd == "leave":
                    out = _report(client, state, client.leave(timeout=DEADLINE))
                else:
                    raise ValueError(cmd)
                conn.send(("ok", out))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if client is not None:
            client.close()


class Rank:
    def __init__(self, port: int, rank: int) -> None:
        self.rank = rank
        self.conn, child = _ctx().Pipe()
        self.proc = _ctx().Process(target=_rank_main, args=(child, port, rank), daemon=True)
        self.proc.start()
        child.close()
        self.ready: Optional[dict] = None

    def result(self, timeout: float = DEADLINE + 10):
        if not self.conn.poll(timeout):
            raise AssertionError(f"rank {self.rank} did not answer within {timeout} s")
        kind, out = self.conn.recv()
        if kind != "ok":
            raise AssertionError(f"rank {self.rank} failed:\n{out}")
        return out

    def call(self, cmd: str, arg=None):
        self.conn.send((cmd, arg))
        return self.result()

    def signal(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(10)
        self.conn.close()
        self.proc.close()


class Cluster:
    """Server in this process + rank processes; ``close()`` kills every child it started."""

    def __init__(self, n: int, **server_kw) -> None:
        kw = dict(world_size=n, heartbeat_timeout_s=TIMEOUT, max_ranks=MAX_RANKS)
        kw.update(server_kw)
        self.server = MembershipServer(HOST, 0, **kw)
        self.ranks: Dict[int, Rank] = {}
        self.retired: List[Rank] = []

    def start(self, rank: int) -> Rank:
        assert rank not in self.ranks
        r = self.ranks[rank] = Rank(self.server.port, rank)
        return r

    def start_all(self, ranks) -> None:
        for r in ranks:
            self.start(r)
        for r in ranks:
            self.ranks[r].ready = self.ranks[r].result()

    def kill(self, rank: int) -> None:
        r = self.ranks.pop(rank)
        r.signal(signal.SIGKILL)
        r.proc.join(10)
        self.retired.append(r)

    def wait_all(self, spec: dict, ranks=None) -> List[dict]:
        ranks = sorted(self.ranks) if ranks is None else ranks
        for r in ranks:
            self.ranks[r].conn.send(("wait", spec))
        return [self.ranks[r].result() for r in ranks]

    def close(self) -> None:
        for r in list(self.ranks.values()) + self.retired:
            try:
                r.kill()
            except Exception:
                pass
        self.ranks.clear()
        self.retired.clear()
        self.server.close()


def _assert_agree(reports: List[dict], live: List[int], epoch: int) -> None:
    incs = reports[0]["incarnations"]
    for rep in reports:
        assert rep["live"] == live and rep["epoch"] == epoch, rep
        assert rep["incarnations"] == incs, (rep, reports[0])
        # the bound state manager holds the agreed live set and epoch
        assert rep["state_live"] == live and rep["state_membership_epoch"] == epoch, rep
        assert rep["state_epoch"] == epoch, rep
        assert rep["status"] == "joined", rep


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stop_heartbeats(c: MembershipClient) -> None:
    """An in-process client falls silent (its heartbeat thread stops; its connection stays open)."""
    c._stop.set()
    c._thread.join()


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0"])
def test_sigkill_survivors_agree_on_one_bump(victim):
    """SIGKILL one rank (rank 0 too: the store lives in the server) -> one epoch bump everywhere."""
    cl = Cluster(4)
    try:
        cl.start_all([0, 1, 2, 3])
        formed = cl.wait_all({"live": [0, 1, 2, 3]})
        e0 = formed[0]["epoch"]
        _assert_agree(formed, [0, 1, 2, 3], e0)
        cl.kill(victim)
        survivors = [r for r in range(4) if r != victim]
        after = cl.wait_all({"live": survivors})
        _assert_agree(after, survivors, e0 + 1)  # exactly one bump, the same on every survivor
        view = cl.server.current()
        assert view.epoch == e0 + 1 and [c.kind for c in view.changes] == ["failed"]
        assert view.changes[0].rank == victim and "heartbeat" in view.changes[0].reason
        time.sleep(5 * cl.server.tick_s)
        assert cl.server.current().epoch == e0 + 1  # nothing else happened
    finally:
        cl.close()


def test_sigstop_rank_declared_dead_finds_out_and_rejoins():
    cl = Cluster(4)
    try:
        cl.start_all([0, 1, 2, 3])
        e0 = cl.wait_all({"live": [0, 1, 2, 3]})[0]["epoch"]
        frozen = cl.ranks[3]
        frozen.signal(signal.SIGSTOP)
        after = cl.wait_all({"live": [0, 1, 2]}, ranks=[0, 1, 2])
        _assert_agree(after, [0, 1, 2], e0 + 1)
        frozen.signal(signal.SIGCONT)
        me = frozen.call("status")  # it resumes and reads the agreed view
        assert me["status"] == "dead" and 3 not in me["live"] and me["epoch"] == e0 + 1
        assert me["inc"] == 1 and me["incarnations"][3] == 1
        assert 3 not in me["state_live"]  # its own state knows it too
        # a stale incarnation cannot evict anybody: its report is ignored by the server
        frozen.call("report_dead", 0)
        time.sleep(5 * cl.server.tick_s)
        assert cl.server.current().epoch == e0 + 1 and 0 in cl.server.current().live
        # it rejoins under a new incarnation, every rank sees it
        back = frozen.call("join")
        assert back["inc"] == 2 and back["status"] == "joined"
        final = cl.wait_all({"live": [0, 1, 2, 3], "inc": {3: 2}})
        _assert_agree(final, [0, 1, 2, 3], e0 + 2)
    finally:
        cl.close()


def test_kill_and_restart_rank2_cycles_real_processes():
    """Kill rank 2, start a fresh process as rank 2: higher incarnation, everyone sees it; no leaks."""
    cl = Cluster(4)
    try:
        cl.start_all([0, 1, 2, 3])
        cl.wait_all({"live": [0, 1, 2, 3]})
        gc.collect()
        threads0, fds0 = threading.active_count(), _fds()
        for cycle in range(3):
            e = cl.server.current().epoch
            cl.kill(2)
            if cycle != 1:  # wait for detection; in cycle 1 restart at once (replacement path)
                cl.wait_all({"live": [0, 1, 3]})
            cl.start_all([2])
            inc = cycle + 2
            assert cl.ranks[2].ready["inc"] == inc
            reports = cl.wait_all({"live": [0, 1, 2, 3], "inc": {2: inc}})
            _assert_agree(reports, [0, 1, 2, 3], reports[0]["epoch"])
            assert reports[0]["epoch"] > e
            for r in cl.retired:  # reap the killed process and its pipe
                r.kill()
            cl.retired.clear()
        gc.collect()
        assert threading.active_count() == threads0
        assert abs(_fds() - fds0) <= 2, (fds0, _fds())
    finally:
        cl.close()


def test_threads_as_ranks_ten_cycles_scale_up_no_leaks():
    """Ten kill/rejoin cycles with in-process clients; ranks beyond world_size join (scale-up)."""
    srv = MembershipServer(HOST, 0, world_size=3, heartbeat_timeout_s=0.5, max_ranks=6)
    stable: List[MembershipClient] = []
    extra: List[MembershipClient] = []
    try:
        stable = [MembershipClient(HOST, srv.port, r, HB) for r in range(3)]
        for c in stable:
            c.join(timeout=DEADLINE)
        states = [ElasticEPState(6, "cpu") for _ in stable]
        for c, st in zip(stable, states):
            c.bind_state(st)
        srv.wait_for_epoch(lambda v: v.live == (0, 1, 2), DEADLINE)
        gc.collect()
        threads0, fds0 = threading.active_count(), _fds()
        last_inc = {3: 0, 4: 0, 5: 0}
        for cycle in range(10):
            rank = 3 + cycle % 3  # ranks 3..5 are beyond the launch world size
            c = MembershipClient(HOST, srv.port, rank, HB)
            extra.append(c)
            v = c.join(timeout=DEADLINE)
            assert c.incarnation == last_inc[rank] + 1 and v.is_live(rank, c.incarnation)
            last_inc[rank] = c.incarnation
            live = tuple(sorted((0, 1, 2, rank)))
            views = [s.wait_for_epoch(lambda v: v.live == live, DEADLINE) for s in stable]
            assert len({(v.epoch, v.live) for v in views}) == 1
            how = cycle % 3
            if how == 0:      # crash: silence -> heartbeat timeout
                c.close()
            elif how == 1:    # it falls silent and a peer's transport saw PeerFailure: confirmed
                _stop_heartbeats(c)
                stable[1].report_dead(rank, "PeerFailure in a transfer")
                c.wait_for_epoch(lambda v: not v.is_live(rank), DEADLINE)
                assert c.is_declared_dead()
                c.close()
            else:             # planned scale-down
                c.leave(timeout=DEADLINE)
                assert c.status == "left"
                c.close()
            extra.remove(c)
            del c
            views = [s.wait_for_epoch(lambda v: v.live == (0, 1, 2), DEADLINE) for s in stable]
            assert len({v.epoch for v in views}) == 1
            for st in states:
                assert st.live_ranks() == [0, 1, 2] and st.membership_epoch == views[0].epoch
        gc.collect()
        assert threading.active_count() == threads0
        assert abs(_fds() - fds0) <= 2, (fds0, _fds())
        assert srv.current().incarnations == {0: 1, 1: 1, 2: 1, 3: 4, 4: 3, 5: 3}
    finally:
        for c in stable + extra:
            c.close()
        srv.close()


def test_stale_requests_are_ignored():
    """Requests naming an old incarnation (a leave, a death report) never touch the new one."""
    srv = MembershipServer(HOST, 0, world_size=2, heartbeat_timeout_s=1.0)
    clients: List[MembershipClient] = []
    raw = None
    try:
        clients = [MembershipClient(HOST, srv.port, r, HB) for r in range(2)]
        for c in clients:
            c.join(timeout=DEADLINE)
        old_inc = clients[1].incarnation
        srv.declare_dead(1, "the orchestrator fenced it")
        clients[1].wait_for_epoch(lambda v: not v.is_live(1), DEADLINE)
        v = clients[1].join(timeout=DEADLINE)
        assert clients[1].incarnation == old_inc + 1
        e = v.epoch
        raw = dist.TCPStore(HOST, srv.port, is_master=False, wait_for_workers=False)
        ns = "sglang_elastic/membership/requests"
        raw.queue_push(ns, json.dumps({"op": "leave", "rank": 1, "inc": old_inc}))
        raw.queue_push(ns, json.dumps({"op": "dead", "rank": 1, "inc": old_inc, "reporter": 0,
                                       "reporter_inc": clients[0].incarnation, "reason": "stale"}))
        raw.queue_push(ns, json.dumps({"op": "join", "rank": 1, "inc": old_inc}))
        raw.queue_push(ns, json.dumps({"op": "dead", "rank": 0, "inc": None, "reporter": 1,
                                       "reporter_inc": old_inc, "reason": "stale reporter"}))
        deadline = time.monotonic() + DEADLINE
        while raw.queue_len(ns) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(5 * srv.tick_s)
        assert srv.current().epoch == e and srv.current().live == (0, 1)
        assert srv.current().incarnations[1] == old_inc + 1
        srv.declare_dead(0, "orchestrator says so")
        v = clients[1].wait_for_epoch(e + 1, DEADLINE)
        assert v.live == (1,) and "orchestrator" in v.changes[0].reason
    finally:
        del raw
        for c in clients:
            c.close()
        srv.close()


def test_unreachable_or_dead_store_gives_clear_errors():
    with socket.socket() as s:  # a port nobody listens on
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(MembershipError, match="unreachable"):
        MembershipClient(HOST, port, 0, HB, connect_timeout_s=1.0)
    assert time.monotonic() - t0 < DEADLINE

    srv = MembershipServer(HOST, 0, world_size=1, heartbeat_timeout_s=1.0)
    c = MembershipClient(HOST, srv.port, 0, HB)
    try:
        c.join(timeout=DEADLINE)
        srv.close()
        t0 = time.monotonic()
        with pytest.raises(MembershipError, match="still running") as ei:
            c.wait_for_epoch(lambda v: False, timeout=DEADLINE)  # must not wait the full timeout
        assert not isinstance(ei.value, MembershipTimeout)
        assert time.monotonic() - t0 < DEADLINE
        with pytest.raises(MembershipError):
            c.current()
    finally:
        c.close()
        srv.close()


def test_wait_timeout_and_bad_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        MembershipClient(HOST, 1234, -1)
    with pytest.raises(ValueError, match="non-negative"):
        MembershipClient(HOST, 1234, "3")
    with pytest.raises(ValueError, match="port"):
        MembershipClient(HOST, 70000, 0)
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        MembershipClient(HOST, 1234, 0, heartbeat_interval_s=0)
    with pytest.raises(ValueError, match="max_ranks"):
        MembershipServer(HOST, 0, world_size=4, max_ranks=2)
    with pytest.raises(ValueError, match="world_size"):
        MembershipServer(HOST, 0, world_size=0)
    srv = MembershipServer(HOST, 0, world_size=2, heartbeat_timeout_s=1.0, max_ranks=3)
    c = None
    try:
        fds0 = _fds()
        with pytest.raises(ValueError, match=r"rank 3 is out of range.*0\.\.2"):
            MembershipClient(HOST, srv.port, 3, HB)
        with pytest.raises(ValueError, match="at most half"):
            MembershipClient(HOST, srv.port, 0, heartbeat_interval_s=0.9)
        gc.collect()
        assert abs(_fds() - fds0) <= 2  # rejected clients closed their connection
        c = MembershipClient(HOST, srv.port, 2, HB)  # rank 2 >= world_size but < max_ranks: fine
        with pytest.raises(ValueError, match="non-negative"):
            c.report_dead(-1)
        with pytest.raises(ValueError, match="out of range"):
            c.report_dead(3)
        with pytest.raises(ValueError):
            c.wait_for_epoch(True, 1.0)
        with pytest.raises(RuntimeError, match="cannot leave"):
            c.leave()
        with pytest.raises(MembershipTimeout):
            c.wait_for_epoch(5, timeout=0.3)
        c.join(timeout=DEADLINE)
        with pytest.raises(RuntimeError, match="already"):
            c.join()
        with pytest.raises(ValueError, match="holds 2 ranks"):
            c.bind_state(ElasticEPState(2, "cpu"))
    finally:
        if c is not None:
            c.close()
        srv.close()


def test_sigkill_is_known_everywhere_through_the_connection_not_a_timeout():
    """The server's heartbeat timeout is an hour, each survivor waits with an hour's timeout: only
    the watch connection's end (the kernel closes it when the process dies) can end the waits
    before the test's limit. Covers a joiner killed after joining, a joiner learning of a death
    among the ranks it joined, a rejoin clearing the death, and a clean leave that is no death."""
    cl = Cluster(3, heartbeat_timeout_s=3600.0)
    try:
        cl.start_all([0, 1, 2])
        cl.wait_all({"live": [0, 1, 2]})
        cl.start_all([3])  # a joiner beyond the launch set
        cl.wait_all({"live": [0, 1, 2, 3]})
        for r in (0, 1):
            cl.ranks[r].conn.send(("wait_dead", 3))
        cl.ranks[2].conn.send(("wait_gone", 3))
        cl.kill(3)
        for r in (0, 1):
            assert "heartbeat connection closed" in cl.ranks[r].result()
        gone = cl.ranks[2].result()
        assert gone["live"] == [0, 1, 2] and gone["dead"] == [3], gone
        assert cl.server.liveness.dead() == {3}
        assert "heartbeat connection closed" in cl.server.current().changes[0].reason

        cl.start_all([3])  # the rank comes back under a new incarnation: no longer dead anywhere
        back = cl.wait_all({"live": [0, 1, 2, 3], "inc": {3: 2}})
        assert all(rep["dead"] == [] for rep in back), back
        assert not cl.server.liveness.is_dead(3)

        cl.ranks[3].conn.send(("wait_dead", 0))  # the joiner learns of a death among its elders
        cl.ranks[1].conn.send(("wait_dead", 0))
        cl.kill(0)
        assert "heartbeat connection closed" in cl.ranks[3].result()
        assert "heartbeat connection closed" in cl.ranks[1].result()

        left = cl.ranks[2].call("leave")  # a planned leave, then the process goes: not a death
        assert 2 not in left["live"]
        cl.kill(2)
        rest = cl.wait_all({"live": [1, 3]})
        assert all(rep["dead"] == [0] for rep in rest), rest
        assert [c.kind for c in cl.server.current().changes] == ["left"]
        time.sleep(5 * cl.server.tick_s)
        assert cl.server.current().live == (1, 3) and cl.server.liveness.dead() == {0}
    finally:
        cl.close()


def test_a_report_is_a_suspicion_confirmed_only_by_silence():
    """A member's report evicts a rank only when it shows no sign of life past the grace: a live,
    heartbeating rank that a peer gave up on (a slow peer, a broken group) stays; a frozen one goes
    on the report alone (the heartbeat timeout is an hour here). Non-members cannot report."""
    cl = Cluster(3, heartbeat_timeout_s=3600.0, suspicion_grace_s=0.3)
    raw = None
    try:
        cl.start_all([0, 1, 2])
        e0 = cl.wait_all({"live": [0, 1, 2]})[0]["epoch"]
        cl.ranks[1].call("report_dead", 2)        # rank 2 is alive and heartbeating
        time.sleep(10 * cl.server.suspicion_grace_s)
        assert cl.server.current().epoch == e0 and cl.server.current().live == (0, 1, 2)
        assert not cl.server._suspects             # the suspicion was dropped, not left pending

        cl.ranks[2].signal(signal.SIGSTOP)        # now it is silent: a report from a non-member is
        raw = dist.TCPStore(HOST, cl.server.port, is_master=False, wait_for_workers=False)
        raw.queue_push("sglang_elastic/membership/requests", json.dumps(
            {"op": "dead", "rank": 2, "inc": None, "reporter": 5, "reporter_inc": 1, "reason": "no member"}))
        time.sleep(10 * cl.server.suspicion_grace_s)
        assert cl.server.current().live == (0, 1, 2)   # still ignored
        cl.ranks[0].call("report_dead", 2)        # ...and a member's report is confirmed by silence
        after = cl.wait_all({"live": [0, 1]}, ranks=[0, 1])
        _assert_agree(after, [0, 1], e0 + 1)
        reason = cl.server.current().changes[0].reason
        assert "reported by rank 0" in reason and "no sign of life" in reason, reason
        cl.ranks[2].signal(signal.SIGCONT)
        assert cl.ranks[2].call("status")["status"] == "dead"
    finally:
        del raw
        cl.close()

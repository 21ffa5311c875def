"""StoreVote and store waits end by knowledge: real processes on 127.0.0.1, a voter SIGKILLed.

The membership server's heartbeat timeout, the vote's timeout and the store wait's deadline are all
an hour, far beyond the test's limit: only the killed process's watch connection closing (pushed
by the membership server to every survivor's Liveness) can end the waits, each with PeerFailure
naming the dead rank.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import time
import traceback

import pytest
import torch.distributed as dist

from sglang_elastic.membership import MembershipServer, StoreVote

HOST = "127.0.0.1"
N = 4
HOUR = 3600.0
LIMIT = 60.0  # the test's own bound for any answer


def _rank(rank: int, port: int, conn) -> None:
    """One rank; messages go back over its own pipe (a queue shared with killed processes could be
    left locked by them)."""
    out = _Out(conn)
    try:
        from sglang_elastic.membership import MembershipClient
        from sglang_elastic.transport import Liveness, PeerFailure, store_wait

        lv = Liveness()
        member = MembershipClient(HOST, port, rank, heartbeat_interval_s=0.1, liveness=lv)
        member.join(timeout=LIMIT)
        member.wait_for_epoch(lambda v: len(v.live) == N, timeout=LIMIT)
        store = dist.TCPStore(HOST, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=LIMIT))
        vote = StoreVote(store, rank, HOUR, prefix="test/vote", liveness=lv)
        # round 1: everybody alive; rank 1 suspects rank 3 (a suspicion is not proof: 3 posted)
        out.put((rank, "round1", vote("1", list(range(N)), [3] if rank == 1 else [])))
        if rank >= 2:  # the victims: 2 never votes in round 2, 3 never sets its key
            time.sleep(HOUR)
        try:
            vote.agree("2", list(range(N)), [])
            out.put((rank, "round2", "no failure"))
        except PeerFailure as e:
            out.put((rank, "round2", (e.rank, e.ranks, str(e))))
        out.put((rank, "waiting", None))
        try:
            store_wait(store, "test/from-rank-3", time.monotonic() + HOUR, liveness=lv, ranks=(3,),
                       what="a key rank 3 sets")
            out.put((rank, "wait", "no failure"))
        except PeerFailure as e:
            out.put((rank, "wait", (e.rank, e.ranks, str(e))))
        # a closed watch connection is a departure the server records: stay until the test has read
        # the server's dead set, so that it holds exactly the killed ranks
        conn.poll(LIMIT)
        member.close()
    except Exception:
        out.put((rank, "error", traceback.format_exc()))


class _Out:
    def __init__(self, conn) -> None:
        self.conn = conn

    def put(self, msg) -> None:
        self.conn.send(msg)


def _collect(conns, want: str, ranks) -> dict:
    """The ``want`` message of each of ``ranks``."""
    got = {}
    for r in ranks:
        if not conns[r].poll(LIMIT):
            pytest.fail(f"rank {r} sent no {want!r} within {LIMIT} s")
        rank, kind, payload = conns[r].recv()
        if kind == "error":
            pytest.fail(f"rank {rank} failed:\n{payload}")
        assert kind == want, (rank, kind, payload)
        got[rank] = payload
    return got


def test_vote_and_store_wait_end_with_peer_failure_when_a_rank_is_killed():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "sglang_elastic.membership"])
    server = MembershipServer(HOST, 0, world_size=N, heartbeat_timeout_s=HOUR)
    store = dist.TCPStore(HOST, server.port, is_master=False, wait_for_workers=False)
    pipes = [ctx.Pipe() for _ in range(N)]
    conns = [mine for mine, _ in pipes]
    procs = [ctx.Process(target=_rank, args=(r, server.port, theirs), daemon=True) for r, (_, theirs) in enumerate(pipes)]
    try:
        for p in procs:
            p.start()
        first = _collect(conns, "round1", range(N))
        # nobody dead, but not all ok (rank 1 posted a suspicion): the same outcome everywhere
        assert all(v == ([], False) for v in first.values()), first
        # both survivors posted round 2 and wait for rank 2's post: kill it
        deadline = time.monotonic() + LIMIT
        while not store.check(["test/vote/2/0", "test/vote/2/1"]):
            assert time.monotonic() < deadline, "the survivors never voted"
            time.sleep(0.01)
        procs[2].kill()
        second = _collect(conns, "round2", (0, 1))
        for rank, (dead, ranks, msg) in second.items():
            assert dead == 2 and ranks == [2] and "rank 2 is dead" in msg, (rank, msg)
        # both survivors wait for a key rank 3 will never set: kill it
        _collect(conns, "waiting", (0, 1))
        time.sleep(0.2)
        procs[3].kill()
        waited = _collect(conns, "wait", (0, 1))
        for rank, (dead, ranks, msg) in waited.items():
            assert dead == 3 and "a key rank 3 sets" in msg and "heartbeat connection closed" in msg, (rank, msg)
        assert server.liveness.dead() == {2, 3}
        for r in (0, 1):
            conns[r].send("close")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        for c in conns:
            c.close()
        del store
        server.close()

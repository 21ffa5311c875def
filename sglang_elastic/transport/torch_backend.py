"""``torch`` backend: two-sided send/recv over standalone torch.distributed process groups.

Each live set (epoch) gets its own process group, built directly as ``ProcessGroupGloo`` (and
``ProcessGroupNCCL`` on GPU) over a ``PrefixStore`` unique to that live set; nothing touches the
default process group, so a group can be thrown away and rebuilt over the survivors any number of
times. ``set_peers`` is collective over the new live set.

Failure detection: a killed peer closes its sockets and gloo raises on the pending (or newly
posted) send/recv at once; a frozen peer is caught by the deadline of each wait (``timeout_s``).
After the data phase every participant sends every other participant a token saying "done" or
"rank X failed"; a rank that was only waiting on others thus learns who failed and raises the same
:class:`PeerFailure` within ``timeout_s + slack_s(timeout_s)``. A rank that noticed a failure
still completes its ops with the live peers (for at most half the slack), so that they are not
left waiting for it and blame the wrong rank. CUDA rows between CUDA tensors go over NCCL in one
coalesced group; an NCCL group cannot name the peer that stalled it, so its timeout is resolved by
the gloo tokens and the communicator is aborted at once. A group that saw a failure is marked
broken and rebuilt by the next ``set_peers``.

Every wait also watches the process's :class:`~sglang_elastic.transport.Liveness`: a participant
known dead is given up at once (the groups and waits are :mod:`sglang_elastic.transport.groups`);
a gloo error on a peer's connection is recorded there as its death.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._common import BaseTransport, Plan, log
from .base import PeerFailure, slack_s
from .groups import Group, NcclWork, PairWaiter, form_group

TAG_DATA = 1
TAG_TOKEN = 2
OK = -1
UNKNOWN = -3  # token: "my NCCL transfers timed out, culprit unknown"


class TorchTransport(BaseTransport):
    kind = "torch"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", liveness=None) -> None:
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host,
                         liveness=liveness)
        if self.device.type == "cuda":
            if not dist.is_nccl_available():
                raise RuntimeError("the torch transport on cuda needs torch built with NCCL")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_gloo_available():
            raise RuntimeError("the torch transport needs torch.distributed with gloo")
        self._group: Optional[Group] = None
        self._view: Optional[Tuple[Tuple[int, int], ...]] = None
        self._publish()

    # ------------------------------------------------------------------ groups
    def _backend_peers_set(self, peers, removed, added, rebuild: bool = False) -> None:
        view = tuple((r, self.incarnation if r == self.rank else self._peer_inc[r]) for r in peers)
        # A broken group is renewed too, but that is this rank's knowledge alone: callers after a
        # failure pass ``rebuild`` together, so that nobody waits alone in a formation.
        if view == self._view and self._group is not None and not self._group.broken and not rebuild:
            return
        if view == self._view and len(view) == 1:
            return
        self._drop_group()
        self._view = view
        if len(view) == 1:
            return
        self._group = self._build_group(view)

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.destroy()
            self._group = None
        self._view = None

    def _build_group(self, view) -> Group:
        return form_group(self.store, f"{self.ns}/grp", view, self.rank, self.incarnation, self.device,
                          self.connect_timeout_s, self.host, self.kind, liveness=self.liveness)

    # ------------------------------------------------------------------ execute
    def execute(self, copies, timeout_s: float) -> None:
        begun = self._begin(copies, timeout_s)
        if begun is None:
            return
        plan, snaps = begun
        g = self._group
        if g is None or g.broken or any(r not in g.index for r in plan.participants):
            raise RuntimeError(f"rank {self.rank}: the {self.kind} transport needs set_peers() after a failure "
                               "or membership change before the next execute")
        start = time.monotonic()
        slack = slack_s(timeout_s)
        data_deadline = start + float(timeout_s)
        token_deadline = data_deadline + slack
        others = [r for r in plan.participants if r != self.rank]
        bad: List[int] = []  # failed peers, first noticed first

        def note(r: int, why) -> None:
            # A failed pair is no proof of death here: a live peer that learned of another death
            # tears its group down, closing its pairs too. So it ends this execute (PeerFailure)
            # without marking ``r`` dead in the process's Liveness (which would fail every other
            # wait on ``r``); the caller reports it to membership, which decides.
            if r not in bad:
                log.info("rank %d: rank %d failed: %s", self.rank, r, str(why).splitlines()[0] if why else "")
                bad.append(r)

        for r in others:  # a participant already known dead is given up before anything is posted
            if self.liveness.is_dead(r):
                note(r, f"known dead ({self.liveness.reason(r)})")
        # Token recvs first, so every participant's recv is up before anyone can send a token.
        tok_in = {r: torch.full((1,), -2, dtype=torch.int64) for r in others}
        tok_works: Dict[int, object] = {}
        for r in others:
            try:
                tok_works[r] = g.gloo.recv([tok_in[r]], g.index[r], TAG_TOKEN)
            except RuntimeError as exc:  # posting on a pair whose peer is already gone raises at once
                note(r, exc)
        post_writes: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (destination row, received buffer)
        # Even after a failure, everything towards live peers is posted and waited for (briefly),
        # so that they finish their data phase and hear from us who failed.
        ops, nccl = self._post_data(g, plan, post_writes, bad, note)
        nccl_suspects = self._wait_data(g, ops, nccl, data_deadline, bad, note, grace=slack / 2)
        code = bad[0] if bad else (UNKNOWN if nccl_suspects else OK)
        tok_out = torch.full((1,), code, dtype=torch.int64)
        sends: Dict[int, List[object]] = {}
        for r in others:
            if r not in bad:
                try:
                    sends[r] = [g.gloo.send([tok_out], g.index[r], TAG_TOKEN)]
                except RuntimeError as exc:
                    note(r, exc)
        if not bad:
            blamed = self._wait_tokens(g, tok_works, tok_in, token_deadline, note)
            if blamed is None and nccl_suspects:  # everybody is alive, yet NCCL hung
                blamed = nccl_suspects[0]
            if blamed is not None:
                note(blamed, "reported by a peer")
        if bad:
            g.broken = True
            waiter = PairWaiter(g, sends, token_deadline, self.liveness, "completion tokens")
            end = min(token_deadline, time.monotonic() + slack / 2)
            while waiter.next(end) is not None:  # best effort: live peers read who failed
                pass
            g.abort_nccl()  # unblock the GPU stream now; NCCL's watchdog would kill us later
            raise PeerFailure(bad[0], f"rank {self.rank}: peer rank {bad[0]} failed during execute "
                                      f"({len(plan.participants)} participants, timeout {timeout_s}s)")
        # Everyone finished the data phase: token sends complete promptly (recvs were pre-posted).
        end = max(token_deadline, time.monotonic() + 0.5)
        waiter = PairWaiter(g, sends, end, self.liveness, "completion tokens")
        while waiter.pending:
            nxt = waiter.next(end)
            r, exc = nxt if nxt is not None else (min(waiter.pending), TimeoutError("timed out"))
            if exc is not None:
                g.broken = True
                raise PeerFailure(r, f"rank {self.rank}: completion token to rank {r} failed: {exc}") from exc
        for dst, buf in post_writes:
            dst.copy_(buf)
        self._apply_local(snaps)

    def _wire(self, g: Group, a: dict, b: dict) -> str:
        """'nccl' when both ends are cuda tensors and the group has NCCL, else 'gloo' (host bounce)."""
        if g.nccl is not None and a["device"] == "cuda" and b["device"] == "cuda":
            return "nccl"
        return "gloo"

    def _info(self, rank: int, name: str) -> dict:
        if rank == self.rank:
            return self._locals[name].info()
        return self._peer_meta[rank]["tensors"][name]

    def _post_data(self, g: Group, plan: Plan, post_writes, bad: List[int], note):
        """Post every send and recv of this rank (copy order per peer), skipping failed peers;
        returns ({peer: [gloo work]}, the coalesced NCCL work or None)."""
        ops: Dict[int, List[object]] = {}
        nccl_ops: List[Tuple[int, str, torch.Tensor, int]] = []

        def post(peer, fn, t):
            if peer in bad:
                return
            try:
                ops.setdefault(peer, []).append(fn([t], g.index[peer], TAG_DATA))
            except RuntimeError as exc:
                note(peer, exc)

        for peer, cs in plan.outgoing.items():
            for c in cs:
                row = self._locals[c.src_name].bytes[c.src_row]
                wire = self._wire(g, self._info(c.src, c.src_name), self._info(c.dst, c.dst_name))
                if wire == "nccl":
                    nccl_ops.append((peer, "send", row, 0))
                else:
                    post(peer, g.gloo.send, row.cpu() if row.device.type != "cpu" else row)
        for peer, cs in plan.incoming.items():
            for c in cs:
                dst = self._locals[c.dst_name].bytes[c.dst_row]
                wire = self._wire(g, self._info(c.src, c.src_name), self._info(c.dst, c.dst_name))
                staged = (c.dst_name, c.dst_row) in plan.staged
                if wire == "nccl":
                    buf = torch.empty_like(dst) if staged else dst
                    nccl_ops.append((peer, "recv", buf, 0))
                else:
                    buf = torch.empty(dst.shape, dtype=torch.uint8) if (staged or dst.device.type != "cpu") else dst
                    post(peer, g.gloo.recv, buf)
                if buf is not dst:
                    post_writes.append((dst, buf))
        for p in bad:
            ops.pop(p, None)
        # An NCCL group with a known-dead member would only hang: skip it (the call fails anyway).
        nccl = None
        if nccl_ops and not any(p in bad for p, *_ in nccl_ops):
            nccl = self._post_nccl(g, nccl_ops)
        return ops, nccl

    def _post_nccl(self, g: Group, nccl_ops) -> NcclWork:
        pg = g.nccl
        peers = sorted({p for p, *_ in nccl_ops})
        # One coalesced launch (an NCCL group) for all of this rank's sends and recvs.
        pg._start_coalescing()
        try:
            for peer, op, t, _ in nccl_ops:
                (pg.send if op == "send" else pg.recv)([t], g.index[peer], 0)
        finally:
            w = pg._end_coalescing()
        return NcclWork(w, peers)

    def _wait_data(self, g: Group, ops, nccl: Optional[NcclWork], deadline: float, bad: List[int], note,
                   grace: float) -> List[int]:
        """Wait for this rank's ops; failures go to ``note``. Once a peer failed, ops with the
        others get ``grace`` more seconds (they were posted long ago and should be done).
        Returns the NCCL peers when the coalesced NCCL work did not finish: one NCCL group cannot
        tell which peer stalled it; the gloo completion tokens find out (a dead peer sends none)."""
        end = deadline if not bad else time.monotonic() + grace
        waiter = PairWaiter(g, ops, deadline + grace, self.liveness, "a transfer")
        while waiter.pending:
            nxt = waiter.next(end)
            if nxt is None:  # alive but silent: the deadline blames them
                for p in sorted(waiter.pending):
                    note(p, "no progress before the deadline")
                break
            p, exc = nxt
            if exc is not None:
                first = not bad
                note(p, exc)
                if first:
                    end = time.monotonic() + grace
        if nccl is not None:
            suspect = nccl.wait_until(end, self.liveness)
            if suspect is not None:
                if suspect >= 0:
                    note(suspect, "known dead")
                    return []
                return list(nccl.peers)
        return []

    def _wait_tokens(self, g: Group, works: Dict[int, object], bufs: Dict[int, torch.Tensor], deadline: float,
                     note) -> Optional[int]:
        """Who failed according to the completion tokens (None: nobody); a peer whose token does not
        come is blamed itself."""
        unknown = []
        waiter = PairWaiter(g, {r: [w] for r, w in works.items()}, deadline, self.liveness, "completion tokens")
        while waiter.pending:
            nxt = waiter.next(deadline)
            if nxt is None:
                r = min(waiter.pending)
                log.info("rank %d: no completion token from rank %d in time", self.rank, r)
                return r
            r, exc = nxt
            if exc is not None:
                log.info("rank %d: no completion token from rank %d: %s", self.rank, r, str(exc).splitlines()[0])
                note(r, exc)
                return r
            v = int(bufs[r].item())
            if v == UNKNOWN:
                unknown.append(r)
            elif v != OK:
                return v
        return unknown[0] if unknown else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_group()
        self._locals.clear()

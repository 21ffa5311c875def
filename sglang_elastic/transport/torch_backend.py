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
"""
from __future__ import annotations

import datetime
import hashlib
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._common import BaseTransport, Plan, log, store_wait
from .base import PeerFailure, slack_s

TAG_DATA = 1
TAG_TOKEN = 2
OK = -1
UNKNOWN = -3  # token: "my NCCL transfers timed out, culprit unknown"


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class _Group:
    """One epoch's process groups over ``members`` (sorted global ranks)."""

    def __init__(self, members: Tuple[int, ...], gloo, nccl=None) -> None:
        self.members = members
        self.index = {r: i for i, r in enumerate(members)}
        self.gloo = gloo
        self.nccl = nccl
        self.broken = False

    def destroy(self) -> None:
        for pg in (self.nccl, self.gloo):
            if pg is None:
                continue
            try:
                pg.abort()
            except Exception:  # already aborted / not supported: dropping it is enough
                pass
        self.gloo = self.nccl = None


def form_group(store, ns: str, view, rank: int, incarnation: int, device: torch.device, timeout_s: float,
               host: str, what: str = "torch") -> _Group:
    """Build process groups (gloo, plus NCCL on cuda) over ``view`` = ((rank, incarnation), ...).

    Collective over the view's members, through ``store`` under ``ns``; the k-th formation of the
    same view gets fresh keys, so a group can be rebuilt over the same members any number of times.
    Raises :class:`PeerFailure` naming the first member that did not arrive within ``timeout_s``.
    """
    members = tuple(r for r, _ in view)
    n = len(members)
    h = hashlib.sha1(repr(view).encode()).hexdigest()[:16]
    base = f"{ns}/{h}"
    # Every member adds once per formation of this exact view: the k-th formation is gen k.
    gen = (int(store.add(f"{base}/join", 1)) - 1) // n
    prefix = f"{base}/{gen}/"
    deadline = time.monotonic() + timeout_s
    store.set(f"{prefix}arrived/{rank}", str(incarnation))
    missing = [r for r in members if not store_wait(store, f"{prefix}arrived/{r}", deadline)]
    if missing:
        raise PeerFailure(missing[0], f"rank(s) {missing} did not join the {what} group over {list(members)}")
    idx = members.index(rank)
    gopts = dist.ProcessGroupGloo._Options()
    gopts._timeout = _td(timeout_s)
    gopts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    gloo = dist.ProcessGroupGloo(dist.PrefixStore(prefix + "gloo/", store), idx, n, gopts)
    nccl = None
    if device.type == "cuda":
        nopts = dist.ProcessGroupNCCL.Options()
        nopts._timeout = _td(timeout_s)
        nccl = dist.ProcessGroupNCCL(dist.PrefixStore(prefix + "nccl/", store), idx, n, nopts)
        # Create the communicator now, while every member is known to be here, not lazily
        # inside a later call (where a dead peer would stall its init past the deadline).
        nccl.allreduce([torch.zeros(1, device=device)]).wait()
        torch.cuda.synchronize(device)
    log.debug("rank %d: %s group gen %d over %s", rank, what, gen, list(members))
    return _Group(members, gloo, nccl)


class TorchTransport(BaseTransport):
    kind = "torch"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1") -> None:
        super().__init__(rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host)
        if self.device.type == "cuda":
            if not dist.is_nccl_available():
                raise RuntimeError("the torch transport on cuda needs torch built with NCCL")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_gloo_available():
            raise RuntimeError("the torch transport needs torch.distributed with gloo")
        self._group: Optional[_Group] = None
        self._view: Optional[Tuple[Tuple[int, int], ...]] = None
        self._publish()

    # ------------------------------------------------------------------ groups
    def _backend_peers_set(self, peers, removed, added) -> None:
        view = tuple((r, self.incarnation if r == self.rank else self._peer_inc[r]) for r in peers)
        if view == self._view and self._group is not None and not self._group.broken:
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

    def _build_group(self, view) -> _Group:
        return form_group(self.store, f"{self.ns}/grp", view, self.rank, self.incarnation, self.device,
                          self.connect_timeout_s, self.host, self.kind)

    # ------------------------------------------------------------------ execute
    def execute(self, copies, timeout_s: float) -> None:
        plan = self._plan(copies, timeout_s)
        if plan is None:
            return
        snaps = self._snapshot_local(plan)
        if len(plan.participants) == 1:
            self._apply_local(snaps)
            return
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
            if r not in bad:
                log.info("rank %d: rank %d failed: %s", self.rank, r, str(why).splitlines()[0] if why else "")
                bad.append(r)

        # Token recvs first, so every participant's recv is up before anyone can send a token.
        tok_in = {r: torch.full((1,), -2, dtype=torch.int64) for r in others}
        tok_works: Dict[int, object] = {}
        for r in others:
            try:
                tok_works[r] = g.gloo.recv([tok_in[r]], g.index[r], TAG_TOKEN)
            except Exception as exc:  # posting on a pair whose peer is already gone raises at once
                note(r, exc)
        post_writes: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (destination row, received buffer)
        # Even after a failure, everything towards live peers is posted and waited for (briefly),
        # so that they finish their data phase and hear from us who failed.
        ops = self._post_data(g, plan, post_writes, bad, note)
        nccl_suspects = self._wait_data(ops, data_deadline, bad, note, grace=slack / 2)
        code = bad[0] if bad else (UNKNOWN if nccl_suspects else OK)
        tok_out = torch.full((1,), code, dtype=torch.int64)
        sends = []
        for r in others:
            if r not in bad:
                try:
                    sends.append((r, g.gloo.send([tok_out], g.index[r], TAG_TOKEN)))
                except Exception as exc:
                    note(r, exc)
        if not bad:
            blamed = self._wait_tokens(tok_works, tok_in, token_deadline)
            if blamed is None and nccl_suspects:  # everybody is alive, yet NCCL hung
                blamed = nccl_suspects[0]
            if blamed is not None:
                note(blamed, "reported by a peer")
        if bad:
            g.broken = True
            self._wait_quietly(sends, min(token_deadline, time.monotonic() + slack / 2))
            if g.nccl is not None:  # unblock the GPU stream now; NCCL's watchdog would kill us later
                try:
                    g.nccl.abort()
                except Exception:
                    pass
                g.nccl = None
            raise PeerFailure(bad[0], f"rank {self.rank}: peer rank {bad[0]} failed during execute "
                                      f"({len(plan.participants)} participants, timeout {timeout_s}s)")
        # Everyone finished the data phase: token sends complete promptly (recvs were pre-posted).
        for r, w in sends:
            try:
                w.wait(_td(max(token_deadline - time.monotonic(), 0.5)))
            except Exception as exc:
                g.broken = True
                raise PeerFailure(r, f"rank {self.rank}: completion token to rank {r} failed: {exc}") from exc
        for dst, buf in post_writes:
            dst.copy_(buf)
        self._apply_local(snaps)

    def _wire(self, g: _Group, a: dict, b: dict) -> str:
        """'nccl' when both ends are cuda tensors and the group has NCCL, else 'gloo' (host bounce)."""
        if g.nccl is not None and a["device"] == "cuda" and b["device"] == "cuda":
            return "nccl"
        return "gloo"

    def _info(self, rank: int, name: str) -> dict:
        if rank == self.rank:
            return self._locals[name].info()
        return self._peer_meta[rank]["tensors"][name]

    def _post_data(self, g: _Group, plan: Plan, post_writes, bad: List[int], note) -> List[Tuple[int, object]]:
        """Post every send and recv of this rank (copy order per peer), skipping failed peers;
        returns (peer, work)."""
        ops: List[Tuple[int, object]] = []
        nccl_ops: List[Tuple[int, str, torch.Tensor, int]] = []

        def post(peer, fn, t):
            if peer in bad:
                return
            try:
                ops.append((peer, fn([t], g.index[peer], TAG_DATA)))
            except Exception as exc:
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
        # An NCCL group with a known-dead member would only hang: skip it (the call fails anyway).
        if nccl_ops and not any(p in bad for p, *_ in nccl_ops):
            ops.extend(self._post_nccl(g, nccl_ops))
        return ops

    def _post_nccl(self, g: _Group, nccl_ops) -> List[Tuple[int, object]]:
        pg = g.nccl
        peers = sorted({p for p, *_ in nccl_ops})
        # One coalesced launch (an NCCL group) for all of this rank's sends and recvs.
        pg._start_coalescing()
        try:
            for peer, op, t, _ in nccl_ops:
                (pg.send if op == "send" else pg.recv)([t], g.index[peer], 0)
        finally:
            w = pg._end_coalescing()
        return [(peers[0], _NcclWork(w, peers))]

    def _wait_data(self, ops, deadline: float, bad: List[int], note, grace: float) -> List[int]:
        """Wait for this rank's ops; failures go to ``note``. Once a peer failed, ops with the
        others get ``grace`` more seconds (they were posted long ago and should be done).
        Returns the NCCL peers when the coalesced NCCL work did not finish: one NCCL group cannot
        tell which peer stalled it; the gloo completion tokens find out (a dead peer sends none)."""
        grace_end: Optional[float] = time.monotonic() + grace if bad else None
        for peer, w in ops:
            if peer in bad:
                continue
            end = deadline if grace_end is None else grace_end
            if isinstance(w, _NcclWork):
                if not w.wait_until(end):
                    return list(w.peers)
                continue
            try:
                w.wait(_td(end - time.monotonic()))
            except Exception as exc:
                note(peer, exc)
                if grace_end is None:
                    grace_end = time.monotonic() + grace
        return []

    def _wait_tokens(self, works: Dict[int, object], bufs: Dict[int, torch.Tensor], deadline: float) -> Optional[int]:
        unknown = []
        for r, w in works.items():
            try:
                w.wait(_td(deadline - time.monotonic()))
            except Exception as exc:
                log.info("rank %d: no completion token from rank %d: %s", self.rank, r, str(exc).splitlines()[0])
                return r
            v = int(bufs[r].item())
            if v == UNKNOWN:
                unknown.append(r)
            elif v != OK:
                return v
        return unknown[0] if unknown else None

    @staticmethod
    def _wait_quietly(sends, deadline: float) -> None:
        for _, w in sends:
            try:
                w.wait(_td(deadline - time.monotonic()))
            except Exception:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_group()
        self._locals.clear()


class _NcclWork:
    """Polls an NCCL work against a deadline (NCCL never raises for a frozen peer by itself)."""

    def __init__(self, work, peers) -> None:
        self.work, self.peers = work, peers

    def wait_until(self, deadline: float) -> bool:
        """True when the work finished without error before ``deadline``."""
        delay, start = 2e-5, time.monotonic()
        while True:
            try:
                if self.work.is_completed():
                    self.work.wait()
                    return True
            except Exception:
                return False
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(delay)
            # Tight polling for the first 50 ms (NVLink chunks finish in a few ms), then back off.
            delay = min(2 * delay, 1e-4 if now - start < 0.05 else 0.005)

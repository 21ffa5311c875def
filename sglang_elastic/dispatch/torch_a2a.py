"""``torch`` dispatcher: token exchange over a torch.distributed group (gloo on CPU, NCCL on GPU).

On CPU every peer pair exchanges (header, rows) with gloo send/recv of its own, so a dead peer
fails only its own pair: the survivors finish the call without it, mark it failed and route around
it from the next call. On GPU the exchange is one NCCL ``all_to_all`` of headers and one of rows
(the fast path; NCCL cannot name a dead peer, so a failure there raises :class:`PeerFailure` after
``timeout_s`` and the caller rebuilds with :meth:`TorchDispatcher.set_peers`).

Groups are standalone (built over a ``PrefixStore`` of the orchestrator's store, never the default
group; :func:`~sglang_elastic.transport.form_group`) and rebuilt collectively by
:meth:`TorchDispatcher.set_peers` when membership changes. Waits watch the process's
:class:`~sglang_elastic.transport.Liveness`: a peer known dead is given up at once (gloo waits run
on helper threads, :class:`~sglang_elastic.transport.PairWaiter`), and a peer whose connection
fails is recorded there as dead.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..transport import (Group, Liveness, PairWaiter, PeerDirectory, PeerFailure, PeerWatch, form_group, is_timeout,
                         wait_work)
from .base import Exchange, HostDispatcher

__all__ = ["TorchExchange", "TorchDispatcher"]

_TAG_HDR, _TAG_ROWS = 40, 50


class TorchExchange(Exchange):
    """Pairwise exchange over gloo (CPU) or NCCL all-to-all (cuda); see the module docstring."""

    def __init__(self, rank: int, store, *, device: torch.device, connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", ns: str = "dispatch/torch", liveness: Optional[Liveness] = None) -> None:
        self.rank, self.store, self.device, self.host = rank, store, torch.device(device), host
        self.watch = PeerWatch(liveness, owner=f"torch dispatcher of rank {rank}")
        self.liveness = self.watch.liveness
        self.connect_timeout_s = float(connect_timeout_s)
        self.ns = ns
        self.directory = PeerDirectory(store, ns, rank, self.liveness)
        self.incarnation = self.directory.incarnation
        self.directory.publish({})
        self.group: Optional[Group] = None
        self._view = None

    @property
    def broken(self) -> bool:
        """The group in use is broken (a wait timed out or was left by knowledge: its pairs may be
        closed; :mod:`sglang_elastic.transport.groups`): nothing moves until :meth:`set_peers`."""
        return self.group is not None and self.group.broken

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        ranks = sorted({int(r) for r in ranks} | {self.rank})
        deadline = time.monotonic() + self.connect_timeout_s
        # A rank that restarts must create its dispatcher before it is announced live, so the
        # incarnation read here is the one that will join the group.
        incs = {r: self.incarnation if r == self.rank else self.directory.current(r, deadline) for r in ranks}
        missing = [r for r, inc in incs.items() if inc is None]
        if missing:
            raise PeerFailure(missing[0], f"rank(s) {missing} never created a torch dispatcher")
        view = tuple((r, incs[r]) for r in ranks)
        if view == self._view and self.group is not None and not self.group.broken and not rebuild:
            return
        self._drop()
        for r, inc in view:
            if r != self.rank:
                self.watch.connected(r, inc)  # a new process of a rank we saw die is not dead
        self._view = view
        if len(view) > 1:
            self.group = form_group(self.store, f"{self.ns}/grp", view, self.rank, self.incarnation, self.device,
                                    self.connect_timeout_s, self.host, "torch dispatcher", liveness=self.liveness)

    def _drop(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group, self._view = None, None

    def run(self, seq, phase, sends, row_bytes, deadline):
        if not sends:
            return {}, []
        g = self.group
        unknown = [p for p in sends if g is None or p not in g.index]
        if unknown:
            raise RuntimeError(f"rank {self.rank}: peers {unknown} are not in the dispatcher's group; call "
                               "set_peers() after a membership change")
        if self.device.type == "cuda":
            return self._run_nccl(g, sends, row_bytes, deadline)
        if g.broken:  # nothing can move until set_peers(); nobody is to blame for that
            return {}, []
        return self._run_gloo(g, sends, row_bytes, deadline)

    def _run_gloo(self, g: Group, sends, row_bytes, deadline):
        hdr_len = next(iter(sends.values()))[0].numel()
        # Every receive and send is posted before anyone waits, so no pair can deadlock on another.
        posted: Dict[int, tuple] = {}
        failed: List[int] = [p for p in sends if self.liveness.is_dead(p)]  # known dead: nothing is posted
        for p, (hdr, rows) in sends.items():
            if p in failed:
                continue
            hin = torch.empty(hdr_len, dtype=torch.int64)
            try:
                rh = g.gloo.recv([hin], g.index[p], _TAG_HDR)
                outs = [g.gloo.send([hdr], g.index[p], _TAG_HDR)]
                if rows.shape[0]:
                    outs.append(g.gloo.send([rows.contiguous()], g.index[p], _TAG_ROWS))
            except RuntimeError as exc:  # a pair whose peer is already gone raises at post time
                self._conn_failed(g, p, exc, g.broken)
                failed.append(p)
                continue
            posted[p] = (hin, rh, outs)
        # One waiter per peer: a frozen peer uses up its own deadline only (a gloo wait that times out
        # also closes its pair, so waits cannot be sliced into polls); a peer known dead is left at once.
        # A timed-out or abandoned wait breaks the group (transport.groups: PairWaiter and wait_work
        # mark it): nothing more moves on it until set_peers() rebuilds it.
        fns = {p: (lambda p=p: self._finish_pair(g, p, *posted[p], row_bytes, deadline)) for p in posted}
        waiter = PairWaiter.calls(g, fns, self.liveness, "torch dispatch")
        got: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        while waiter.pending:
            nxt = waiter.next(deadline + 1.0)  # the helper threads themselves end by the deadline
            if nxt is None:  # silent until the deadline: given up on (blamed)
                failed.extend(sorted(waiter.pending))
                break
            p, res = nxt
            if isinstance(res, BaseException):
                failed.append(p)
            else:
                got[p] = res
            if g.broken and time.monotonic() < deadline:
                # Broken early (a frozen peer declared dead was abandoned): its work may time out
                # any time and close every pair, so the peers still pending are not waited for;
                # their pairs are lost (the batch is served again) and nobody is blamed for them.
                break
        return got, failed

    def _finish_pair(self, g: Group, p: int, hin, rh, outs, row_bytes: int, deadline: float):
        """Wait for peer ``p``'s header and rows and for our sends to it; the error if it failed.
        (gloo works may be waited for once only: a second wait blocks for another message.)"""
        exc = self._wait(g, p, rh, deadline)
        if exc is not None:
            return exc
        n = int(hin[2:].sum())
        buf = torch.empty(n, row_bytes, dtype=torch.uint8)
        if n:
            broken = g.broken
            try:
                rr = g.gloo.recv([buf], g.index[p], _TAG_ROWS)
            except RuntimeError as exc:
                self._conn_failed(g, p, exc, broken)
                return exc.with_traceback(None)
            exc = self._wait(g, p, rr, deadline)
            if exc is not None:
                return exc
        # Sends must be complete before the caller reuses its buffers.
        for w in outs:
            exc = self._wait(g, p, w, deadline)
            if exc is not None:
                return exc
        return hin, buf

    def _wait(self, g: Group, peer: int, work, deadline: float) -> Optional[BaseException]:
        broken = g.broken
        exc = wait_work(g, work, deadline)  # a failure marks the group broken
        if exc is not None and not is_timeout(exc):
            self._conn_failed(g, peer, exc, broken)
        return exc

    def _conn_failed(self, g: Group, peer: int, exc: BaseException, was_broken: bool) -> None:
        """A pair's connection failed: its peer is gone (only that pair failed), unless our group
        was broken when the wait began or is now (a timeout here closed every pair, or set_peers()
        aborted it, waking waits still pending from an earlier step): then it is no evidence."""
        if g is self.group and not was_broken and not g.broken:
            self.watch.dead(peer, f"its connection failed: {str(exc).splitlines()[0]}")

    def _run_nccl(self, g: Group, sends, row_bytes, deadline):
        members = g.members
        missing = [p for p in members if p != self.rank and p not in sends]
        if missing:
            raise RuntimeError(f"the NCCL dispatcher exchanges with every member; no data for {missing}")
        hdr_len = next(iter(sends.values()))[0].numel()
        hout = torch.zeros(len(members), hdr_len, dtype=torch.int64)
        rows_out = []
        for i, p in enumerate(members):
            if p != self.rank:
                hout[i] = sends[p][0]
                rows_out.append(sends[p][1])
            else:
                rows_out.append(torch.empty(0, row_bytes, dtype=torch.uint8, device=self.device))
        hin = torch.empty_like(hout, device=self.device)
        self._a2a(g, hin, hout.to(self.device), None, None, deadline)
        hin = hin.cpu()
        in_n = [int(x) for x in hin[:, 2:].sum(1)]
        out_n = [r.shape[0] for r in rows_out]
        src = torch.cat([r.to(self.device) for r in rows_out]).contiguous()
        dst = torch.empty(sum(in_n), row_bytes, dtype=torch.uint8, device=self.device)
        self._a2a(g, dst, src, [n * row_bytes for n in in_n], [n * row_bytes for n in out_n], deadline, flat=True)
        got, o = {}, 0
        for i, p in enumerate(members):
            if p != self.rank:
                got[p] = (hin[i], dst[o:o + in_n[i]])
            o += in_n[i]
        return got, []

    def _a2a(self, g: Group, out, inp, out_splits, in_splits, deadline, flat: bool = False) -> None:
        import torch.distributed as dist

        o, i = (out.view(-1), inp.view(-1)) if flat else (out, inp)
        work = g.nccl.alltoall_base(o, i, out_splits or [], in_splits or [], dist.AllToAllOptions())
        others = [r for r in g.members if r != self.rank]
        while not work.is_completed():
            dead = self.liveness.first_dead(others)
            if dead is not None:
                g.abort_nccl()
                raise PeerFailure(dead, f"rank {self.rank}: rank {dead} is dead ({self.liveness.reason(dead)}) during "
                                        "the NCCL all-to-all; rebuild the group")
            if time.monotonic() > deadline:
                g.abort_nccl()
                raise PeerFailure(-1, f"rank {self.rank}: NCCL all-to-all did not finish in time; rebuild the group")
            time.sleep(2e-5)
        work.wait()

    def close(self) -> None:
        self._drop()


class TorchDispatcher(HostDispatcher):
    """The ``torch`` dispatcher. ``store`` is a ``torch.distributed.Store`` served outside the ranks;
    construction is collective over the live ranks of ``state`` unless ``connect=False`` (then call
    :meth:`set_peers`); see :class:`Dispatcher` for the rest."""

    kind = "torch"

    def __init__(self, *, store, connect_timeout_s: float = 60.0, host: str = "127.0.0.1", connect: bool = True,
                 ns: str = "dispatch/torch", liveness: Optional[Liveness] = None, **kw) -> None:
        if store is None:
            raise ValueError("the torch dispatcher needs a torch.distributed.Store (e.g. the orchestrator's TCPStore)")
        device = torch.device(kw.get("device", "cpu"))
        super().__init__(None, liveness=liveness, **kw)
        # One dispatcher per namespace at a time: peers read each other's incarnation under ``ns``.
        self.exchange = TorchExchange(self.rank, store, device=device, connect_timeout_s=connect_timeout_s, host=host,
                                      ns=ns, liveness=self.liveness)
        if connect:  # a joining rank connects later, when the others are told about it
            self.set_peers(self.state.live_ranks())

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        """Rebuild the group over ``ranks`` (collective over them), e.g. after a rank joined; with
        ``rebuild`` even when the members are unchanged (every member must pass it together)."""
        self.exchange.set_peers(ranks, rebuild)

    def close(self) -> None:
        self.exchange.close()

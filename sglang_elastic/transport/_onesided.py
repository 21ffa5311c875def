"""The protocol shared by the one-sided backends (NIXL, Mooncake): destinations READ source rows.

Per execute (``eid`` names it identically on every participant, see ``BaseTransport._eid``):

1. READY  -- each rank tells the ranks that read from it that it entered ``execute`` (its rows
   hold the values to be read) and which metadata version it has (newer registrations);
2. reads  -- on READY from a source, the destination posts one-sided READs of its rows (into a
   registered scratch area when the destination row is itself a source of this execute);
3. RDONE  -- when all reads from a source completed, the destination tells that source;
4. apply  -- a rank whose reads are done and whose readers all sent RDONE writes its staged rows
   and local copies, then sends FIN to every participant;
5. FIN    -- a rank returns when it has FIN from every participant.

Failures: a participant known dead in the process's :class:`~sglang_elastic.transport.Liveness`
(checked on every poll), a read error or a failed liveness probe names the peer at once (the
latter two are recorded in the Liveness as deaths); past ``timeout_s`` a
rank still waiting for READY / reads / RDONE of a peer (a direct dependency) blames that peer;
a rank waiting only for FIN (an indirect dependency) waits ``slack_s`` more for somebody's FAIL
notice before blaming the lowest silent rank. Whoever blames a peer sends FAIL(peer) to everyone,
so all participants raise :class:`PeerFailure` naming the same rank within
``timeout_s + slack_s(timeout_s)``.
"""
from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from ._common import BaseTransport, Plan, log
from .base import Copy, PeerFailure, slack_s
from .watch import PeerUnreachable


class Sync:
    """Control messages of one execute. ``poll`` refreshes the public fields."""

    def __init__(self, eid: str, me: int, participants: Tuple[int, ...]) -> None:
        self.eid, self.me, self.participants = eid, me, participants
        self.ready: Dict[int, int] = {}  # src rank -> its metadata version
        self.rdone: Set[int] = set()  # readers that finished reading from me
        self.fin: Set[int] = set()  # participants that finished
        self.failure: Optional[int] = None  # a rank somebody blamed

    @abstractmethod
    def send_ready(self, readers: List[int], version: int) -> None: ...

    @abstractmethod
    def send_rdone(self, src: int) -> None: ...

    @abstractmethod
    def send_fin(self) -> None: ...

    @abstractmethod
    def send_fail(self, blamed: int) -> None: ...

    @abstractmethod
    def poll(self, want_ready: Set[int], want_rdone: Set[int], want_fin: bool) -> None: ...

    def missing_fin(self, others: List[int]) -> Set[int]:
        return set(others) - self.fin

    def close(self, ok: bool) -> None:
        pass


@dataclass
class _Src:
    """Reads from one source rank."""

    copies: List[Copy]
    handles: list = field(default_factory=list)
    posted: bool = False
    done: bool = False


class OneSidedTransport(BaseTransport):
    """Backends implement: ``_sync``, ``_post_reads``, ``_poll_read``, ``_abandon``,
    ``_scratch_register`` / ``_scratch_deregister``; their endpoint installs its probe into
    ``self.watch``."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._scratch: Dict[str, Tuple[torch.Tensor, object]] = {}  # device str -> (buffer, handle)
        self._graveyard: List[Tuple[torch.Tensor, object]] = []  # buffers with abandoned reads in flight

    # ---------------------------------------------------------------- backend hooks
    @abstractmethod
    def _sync(self, eid: str, plan: Plan) -> Sync: ...

    @abstractmethod
    def _post_reads(self, src: int, items: List[Tuple[torch.Tensor, dict, int]]) -> list:
        """Post READs of ``(local byte row, remote tensor info, remote row)`` from ``src``; returns handles."""

    @abstractmethod
    def _poll_read(self, src: int, handle) -> str:
        """'DONE', 'PROC' or 'ERR'."""

    @abstractmethod
    def _abandon(self, src: int, handle) -> bool:
        """Give up a read; True if it is certainly cancelled (its local buffer may be reused)."""

    @abstractmethod
    def _scratch_register(self, buf: torch.Tensor):
        ...

    @abstractmethod
    def _scratch_deregister(self, handle) -> None:
        ...

    # ---------------------------------------------------------------- scratch
    def _scratch_rows(self, plan: Plan) -> Dict[Tuple[str, int], torch.Tensor]:
        """Registered scratch rows for the staged destination rows, one area per device."""
        need: Dict[str, int] = {}
        rows: List[Tuple[Tuple[str, int], str, int]] = []
        for src, cs in plan.incoming.items():
            for c in cs:
                if (c.dst_name, c.dst_row) in plan.staged:
                    loc = self._locals[c.dst_name]
                    dev = str(loc.bytes.device)
                    rows.append(((c.dst_name, c.dst_row), dev, loc.row_bytes))
                    need[dev] = need.get(dev, 0) + loc.row_bytes
        out: Dict[Tuple[str, int], torch.Tensor] = {}
        if not rows:
            return out
        for dev, nbytes in need.items():
            cur = self._scratch.get(dev)
            if cur is None or cur[0].numel() < nbytes:
                if cur is not None:
                    self._scratch_deregister(cur[1])
                size = 1 << max(12, (nbytes - 1).bit_length())
                buf = torch.empty(size, dtype=torch.uint8, device=dev)
                self._scratch[dev] = (buf, self._scratch_register(buf))
        offs: Dict[str, int] = {}
        for key, dev, nb in rows:
            o = offs.get(dev, 0)
            out[key] = self._scratch[dev][0][o:o + nb]
            offs[dev] = o + nb
        return out

    def _retire_scratch(self) -> None:
        """After abandoned reads: keep the scratch areas alive (a late read may still land there)."""
        for dev, (buf, handle) in list(self._scratch.items()):
            self._graveyard.append((buf, handle))
        self._scratch.clear()

    # ---------------------------------------------------------------- execute
    def execute(self, copies, timeout_s: float) -> None:
        begun = self._begin(copies, timeout_s)
        if begun is None:
            return
        plan, snaps = begun
        start = time.monotonic()
        deadline = start + float(timeout_s)
        final_deadline = deadline + slack_s(timeout_s)
        eid = self._eid(plan.participants)
        sync = self._sync(eid, plan)
        srcs = {s: _Src(cs) for s, cs in plan.incoming.items()}
        readers = set(plan.outgoing)
        others = [r for r in plan.participants if r != self.rank]
        scratch = self._scratch_rows(plan)
        ok = False
        try:
            self._run(plan, sync, srcs, readers, others, scratch, snaps, timeout_s, start, deadline, final_deadline)
            ok = True
        except PeerUnreachable as exc:  # a control message could not reach a peer: it is gone
            raise self._fail(sync, exc.rank, f"rank {exc.rank} is unreachable: {exc.__cause__ or exc}",
                             dead=True) from None
        finally:
            if not ok:
                cancelled = True
                for s, st in srcs.items():
                    for h in st.handles:
                        cancelled &= bool(self._abandon(s, h))
                    st.handles = []
                if not cancelled:
                    self._retire_scratch()
            sync.close(ok)

    def _run(self, plan, sync, srcs, readers, others, scratch, snaps, timeout_s, start, deadline, final_deadline):
        applied = False
        w = self.watch.wait(f"{self.kind} transfer")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # rows written on a stream must be in memory before READY
        sync.send_ready(sorted(readers), self._version)
        while True:
            progressed = False
            want_ready = {s for s, st in srcs.items() if not st.posted}
            want_rdone = readers - sync.rdone
            sync.poll(want_ready, want_rdone, applied)
            if sync.failure is not None:
                raise self._fail(sync, sync.failure, f"rank {sync.failure} failed (reported by a peer)", notify=False)
            for s in want_ready:
                if s in sync.ready:
                    try:
                        self._start_reads(sync, s, srcs[s], sync.ready[s], scratch)
                    except (ValueError, PeerFailure):
                        raise
                    except Exception as exc:  # noqa: BLE001 - the library's error types vary; the peer is blamed
                        raise self._fail(sync, s, f"posting reads from rank {s} failed: {exc}", dead=True)
                    progressed = True
            for s, st in srcs.items():
                if st.posted and not st.done:
                    left = []
                    for h in st.handles:
                        try:
                            x = self._poll_read(s, h)
                        except Exception as exc:  # noqa: BLE001 - the library's error types vary; the peer is blamed
                            raise self._fail(sync, s, f"a read from rank {s} failed: {exc}", dead=True)
                        if x == "ERR":
                            raise self._fail(sync, s, f"a read from rank {s} failed", dead=True)
                        if x != "DONE":
                            left.append(h)
                    st.handles = left
                    if not left:
                        st.done = True
                        sync.send_rdone(s)
                        progressed = True
            if not applied and all(st.done for st in srcs.values()) and readers <= sync.rdone:
                for key, buf in scratch.items():
                    self._locals[key[0]].bytes[key[1]].copy_(buf)
                self._apply_local(snaps)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                applied = True
                sync.send_fin()
                progressed = True
            if applied and set(others) <= sync.fin:
                return
            direct = sorted({s for s, st in srcs.items() if not st.done} | (readers - sync.rdone))
            # Known dead (any rank we still wait for), or a failed probe (the ones we wait on first).
            gone = w.failed(sorted(set(direct) | (set(others) - sync.fin)), probe=direct or sorted(set(others) - sync.fin))
            if gone:
                raise self._fail(sync, gone[0][0], gone[0][1])
            now = time.monotonic()
            if now >= deadline and direct:
                raise self._fail(sync, direct[0], f"no progress from rank(s) {direct} within {timeout_s}s")
            if now >= final_deadline:
                silent = sorted(sync.missing_fin(others)) or others
                raise self._fail(sync, silent[0], f"no completion from rank(s) {silent} within "
                                                   f"{timeout_s}s + {slack_s(timeout_s):.1f}s")
            w.sleep(progressed)

    def _fail(self, sync: Sync, blamed: int, why: str, *, notify: bool = True, dead: bool = False) -> PeerFailure:
        """Tell the others (FAIL) and build the PeerFailure; ``dead``: we saw it die (recorded)."""
        if dead:
            self.watch.dead(blamed, why, self._peer_inc.get(blamed))
        if notify:
            try:
                sync.send_fail(blamed)
            except Exception as exc:  # best effort: the others have their own deadlines
                log.debug("rank %d: could not spread FAIL(%d): %s", self.rank, blamed, exc)
        log.info("rank %d: execute %s failed: %s", self.rank, sync.eid, why)
        return PeerFailure(blamed, f"rank {self.rank}: {why}")

    def _start_reads(self, sync: Sync, src: int, st: _Src, version: int, scratch) -> None:
        meta = self._peer_meta[src]
        if version != meta["version"]:
            meta = self._refresh_meta(src)
        items = []
        for c in st.copies:
            info = meta["tensors"].get(c.src_name)
            if info is None or not 0 <= c.src_row < info["rows"]:
                self._fail(sync, src, f"rank {src} re-registered {c.src_name!r} during execute")
                raise ValueError(f"rank {src} re-registered {c.src_name!r} during execute; {c} no longer fits")
            dst = scratch.get((c.dst_name, c.dst_row))
            if dst is None:
                dst = self._locals[c.dst_name].bytes[c.dst_row]
            items.append((dst, info, c.src_row))
        st.handles = self._post_reads(src, items) if items else []
        st.posted = True
        if not items:
            st.done = True

    def close(self) -> None:  # subclasses extend
        self._scratch.clear()
        self._graveyard.clear()

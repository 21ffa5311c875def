"""What every backend shares: local registrations, metadata in the store, incarnations, the live
peer set, and validation of a copy list into this rank's part of it.

Incarnations and metadata live in the store under ``ns = transport/<kind>`` through a
:class:`~sglang_elastic.transport.directory.PeerDirectory` (``ns/<rank>/inc``, ``ns/<rank>/cur``,
``ns/<rank>/<inc>/meta``: the registered tensors and what the backend needs to reach this rank,
republished on every ``register``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from .base import Copy, PeerFailure, Transport
from .directory import PeerDirectory
from .liveness import Liveness
from .watch import PeerWatch

log = logging.getLogger("sglang_elastic.transport")

Row = Tuple[str, int]  # (tensor name, row) on this rank


@dataclass
class Local:
    """A registered local tensor and its byte view ``[rows, row_bytes]``."""

    tensor: torch.Tensor
    bytes: torch.Tensor
    rows: int
    row_bytes: int
    handle: object = None  # backend registration handle
    reg_addr: int = 0  # address the backend registered (storage can move: share_memory_, ...)

    @property
    def addr(self) -> int:
        return self.bytes.data_ptr()

    def info(self) -> dict:
        dev = self.tensor.device
        return {"rows": self.rows, "row_bytes": self.row_bytes, "addr": self.addr,
                "device": dev.type, "index": 0 if dev.index is None else dev.index}


@dataclass
class Plan:
    """This rank's part of one validated copy list."""

    participants: Tuple[int, ...]
    local: List[Copy] = field(default_factory=list)
    incoming: Dict[int, List[Copy]] = field(default_factory=dict)  # src rank -> copies into me
    outgoing: Dict[int, List[Copy]] = field(default_factory=dict)  # dst rank -> copies from me
    staged: Set[Row] = field(default_factory=set)  # my destination rows that are also sources here

    @property
    def remote(self) -> bool:
        return bool(self.incoming or self.outgoing) or len(self.participants) > 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def byte_view(tensor: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """``tensor`` as ``[rows, row_bytes]`` uint8 sharing its memory."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 1:
        raise ValueError("a registered tensor needs at least one dimension (its rows)")
    if not tensor.is_contiguous():
        raise ValueError("a registered tensor must be contiguous (rows are moved as raw bytes)")
    if tensor.is_sparse or tensor.is_quantized:
        raise ValueError("a registered tensor must be dense")
    rows = int(tensor.shape[0])
    per_row = 1
    for d in tensor.shape[1:]:
        per_row *= int(d)
    row_bytes = per_row * tensor.element_size()
    flat = tensor.view(rows, per_row) if per_row > 0 else tensor.reshape(rows, 0)
    b = flat.view(torch.uint8) if tensor.dtype != torch.uint8 else flat
    if b.shape != (rows, row_bytes):  # e.g. 0-sized rows
        b = b.reshape(rows, row_bytes)
    return b, rows, row_bytes


class BaseTransport(Transport):
    """Shared machinery; backends implement the ``_backend_*`` hooks and ``execute``."""

    kind = "base"

    def __init__(self, rank: int, store, *, device="cpu", connect_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", liveness: Optional[Liveness] = None) -> None:
        if not _is_int(rank) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        if store is None:
            raise ValueError("a torch.distributed.Store (e.g. a TCPStore served by the orchestrator) is required")
        self.rank = int(rank)
        self.store = store
        self.device = torch.device(device)
        self.host = host
        self.connect_timeout_s = float(connect_timeout_s)
        self.ns = f"transport/{self.kind}"
        if liveness is not None and not isinstance(liveness, Liveness):
            raise ValueError(f"liveness must be a sglang_elastic.transport.Liveness, got {type(liveness).__name__}")
        # Failure knowledge: the process's Liveness (read by every wait) plus what this transport sees.
        self.watch = PeerWatch(liveness, owner=f"{self.kind} transport of rank {self.rank}")
        self.liveness = self.watch.liveness
        self.watch.incarnation_of = lambda r: self._peer_inc.get(r)
        try:
            self.directory = PeerDirectory(store, self.ns, self.rank, self.liveness)
            self.incarnation = self.directory.incarnation
        except Exception as exc:  # noqa: BLE001 - unreachable store, closed connection...: re-raised with context
            raise RuntimeError(f"transport {self.kind!r}: the store is not usable: {exc}") from exc
        self._locals: Dict[str, Local] = {}
        self._version = 0
        self._peers: Tuple[int, ...] = (self.rank,)
        self._peer_inc: Dict[int, int] = {}
        self._peer_meta: Dict[int, dict] = {}
        self._eid_count: Dict[str, int] = {}
        self._closed = False

    # ------------------------------------------------------------------ metadata
    def _backend_meta(self) -> dict:
        return {}

    def _publish(self) -> None:
        self._version += 1
        meta = {"rank": self.rank, "inc": self.incarnation, "version": self._version,
                "tensors": {n: l.info() for n, l in self._locals.items()}}
        meta.update(self._backend_meta())
        self.directory.publish(meta)

    def _fetch_meta(self, rank: int, inc: int, deadline: float) -> dict:
        meta = self.directory.meta(rank, inc, deadline)
        if meta is None:
            raise PeerFailure(rank, f"rank {rank} (incarnation {inc}) published no transport metadata in time")
        return meta

    def _current_inc(self, rank: int, deadline: float) -> int:
        inc = self.directory.current(rank, deadline)
        if inc is None:
            raise PeerFailure(rank, f"rank {rank} never created a {self.kind!r} transport")
        return inc

    def _refresh_meta(self, rank: int) -> dict:
        """Re-read a peer's metadata (newer registrations); calls the backend's update hook."""
        inc = self._peer_inc[rank]
        meta = self.directory.meta(rank, inc)
        if meta is None:
            raise KeyError(f"rank {rank} (incarnation {inc}) has no metadata in the store")
        old = self._peer_meta.get(rank)
        if old is None or meta["version"] != old["version"]:
            self._peer_meta[rank] = meta
            self._backend_peer_updated(rank, meta)
        return self._peer_meta[rank]

    # ------------------------------------------------------------------ register
    def register(self, name: str, tensor: torch.Tensor) -> None:
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
        b, rows, row_bytes = byte_view(tensor)
        self._check_device(tensor)
        old = self._locals.get(name)
        loc = Local(tensor, b, rows, row_bytes, reg_addr=b.data_ptr())
        loc.handle = self._backend_register(name, loc, old)
        self._locals[name] = loc
        self._publish()

    def unregister(self, name: str) -> None:
        self._check_open()
        old = self._locals.pop(name, None)
        if old is None:
            return
        self._backend_unregister(name, old)
        self._publish()

    def _backend_unregister(self, name: str, old: Local) -> None:
        pass

    def _check_device(self, tensor: torch.Tensor) -> None:
        if tensor.device.type not in ("cpu", self.device.type):
            raise ValueError(f"tensor on {tensor.device} cannot be registered with a transport on {self.device}")

    def _backend_register(self, name: str, loc: Local, old: Optional[Local]):
        return None

    # ------------------------------------------------------------------ peers
    def _check_ranks(self, ranks: Sequence[int]) -> Tuple[int, ...]:
        try:
            rs = list(ranks)
        except TypeError:
            raise ValueError(f"ranks must be a sequence of ints, got {ranks!r}") from None
        if not all(_is_int(r) or (hasattr(r, "__index__") and not isinstance(r, bool)) for r in rs):
            raise ValueError(f"ranks must be ints, got {ranks!r}")
        rs = [int(r) for r in rs]
        if any(r < 0 for r in rs) or len(set(rs)) != len(rs):
            raise ValueError(f"ranks must be distinct non-negative ints, got {rs}")
        if self.rank not in rs:
            raise ValueError(f"set_peers({rs}) must include this rank ({self.rank})")
        return tuple(sorted(rs))

    def set_peers(self, ranks: Sequence[int], rebuild: bool = False) -> None:
        self._check_open()
        new = self._check_ranks(ranks)
        deadline = time.monotonic() + self.connect_timeout_s
        incs: Dict[int, int] = {}
        for r in new:
            if r != self.rank:
                incs[r] = self._current_inc(r, deadline)
        removed = [r for r in self._peer_inc if r not in incs or incs[r] != self._peer_inc[r]]
        for r in removed:
            self._backend_peer_removed(r)
            self._peer_inc.pop(r, None)
            self._peer_meta.pop(r, None)
        added = [r for r in incs if r not in self._peer_inc]
        for r in added:
            meta = self._fetch_meta(r, incs[r], deadline)
            self.watch.connected(r, incs[r])  # a new process of a rank we saw die is not dead
            self._peer_inc[r] = incs[r]
            self._peer_meta[r] = meta
            self._backend_peer_added(r, meta)
        self._peers = new
        self._backend_peers_set(new, removed, added, rebuild)

    def _backend_peer_removed(self, rank: int) -> None:
        pass

    def _backend_peer_added(self, rank: int, meta: dict) -> None:
        pass

    def _backend_peer_updated(self, rank: int, meta: dict) -> None:
        pass

    def _backend_peers_set(self, peers: Tuple[int, ...], removed: List[int], added: List[int],
                           rebuild: bool = False) -> None:
        pass

    @property
    def peers(self) -> Tuple[int, ...]:
        """The live set given to the last :meth:`set_peers` (this rank alone before)."""
        return self._peers

    # ------------------------------------------------------------------ validation
    def _tensor_info(self, rank: int, name: str) -> Optional[dict]:
        if rank == self.rank:
            loc = self._locals.get(name)
            return None if loc is None else {"rows": loc.rows, "row_bytes": loc.row_bytes}
        meta = self._peer_meta.get(rank)
        return None if meta is None else meta["tensors"].get(name)

    def _plan(self, copies: Sequence[Copy], timeout_s: float) -> Optional[Plan]:
        """Validate ``copies`` identically on every participant; None if this rank takes no part."""
        self._check_open()
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        try:
            copies = list(copies)
        except TypeError:
            raise ValueError("copies must be a sequence of Copy") from None
        parts: Set[int] = set()
        for i, c in enumerate(copies):
            if not isinstance(c, Copy):
                raise ValueError(f"copies[{i}] is {type(c).__name__}, expected Copy")
            if not (_is_int(c.src) and _is_int(c.dst) and _is_int(c.src_row) and _is_int(c.dst_row)):
                raise ValueError(f"copies[{i}] = {c}: ranks and rows must be ints")
            if not (isinstance(c.src_name, str) and isinstance(c.dst_name, str)):
                raise ValueError(f"copies[{i}] = {c}: tensor names must be str")
            parts.add(c.src)
            parts.add(c.dst)
        if self.rank not in parts:
            return None
        self._check_moved(copies)
        live = set(self._peers)
        bad = sorted(r for r in parts if r not in live)
        if bad:
            raise ValueError(f"copies name rank(s) {bad} that are not live peers (peers: {list(self._peers)}); "
                             "call set_peers first")
        deadline = time.monotonic() + float(timeout_s)
        dsts: Dict[Tuple[int, str, int], int] = {}
        for i, c in enumerate(copies):
            s = self._info_waiting(c.src, c.src_name, deadline)
            d = self._info_waiting(c.dst, c.dst_name, deadline)
            if s is not None and d is not None and not self._rows_fit(c, s, d):
                # A peer may have registered the name again with more rows (e.g. a new updater with
                # larger chunks): re-read its metadata before calling the copy invalid.
                s, d = self._fresh_infos(c, deadline)
            if s is None:
                raise ValueError(f"copies[{i}] = {c}: rank {c.src} has no tensor registered as {c.src_name!r}")
            if d is None:
                raise ValueError(f"copies[{i}] = {c}: rank {c.dst} has no tensor registered as {c.dst_name!r}")
            if not 0 <= c.src_row < s["rows"]:
                raise ValueError(f"copies[{i}] = {c}: source row {c.src_row} out of range "
                                 f"(rank {c.src} {c.src_name!r} has {s['rows']} rows)")
            if not 0 <= c.dst_row < d["rows"]:
                raise ValueError(f"copies[{i}] = {c}: destination row {c.dst_row} out of range "
                                 f"(rank {c.dst} {c.dst_name!r} has {d['rows']} rows)")
            if s["row_bytes"] != d["row_bytes"]:
                raise ValueError(f"copies[{i}] = {c}: row size mismatch: {c.src_name!r} on rank {c.src} has "
                                 f"{s['row_bytes']} bytes per row, {c.dst_name!r} on rank {c.dst} has {d['row_bytes']}")
            key = (c.dst, c.dst_name, c.dst_row)
            if key in dsts:
                raise ValueError(f"copies[{i}] = {c}: destination row already written by copies[{dsts[key]}]")
            dsts[key] = i
        plan = Plan(participants=tuple(sorted(parts)))
        my_sources: Set[Row] = set()
        for c in copies:
            if c.src == self.rank and c.dst == self.rank:
                plan.local.append(c)
            elif c.dst == self.rank:
                plan.incoming.setdefault(c.src, []).append(c)
            elif c.src == self.rank:
                plan.outgoing.setdefault(c.dst, []).append(c)
            if c.src == self.rank:
                my_sources.add((c.src_name, c.src_row))
        for cs in plan.incoming.values():
            for c in cs:
                if (c.dst_name, c.dst_row) in my_sources:
                    plan.staged.add((c.dst_name, c.dst_row))
        return plan

    @staticmethod
    def _rows_fit(c: Copy, s: dict, d: dict) -> bool:
        return 0 <= c.src_row < s["rows"] and 0 <= c.dst_row < d["rows"] and s["row_bytes"] == d["row_bytes"]

    def _fresh_infos(self, c: Copy, deadline: float) -> Tuple[Optional[dict], Optional[dict]]:
        """Tensor infos of ``c``'s two sides from freshly read peer metadata (read once: a bad row
        must still be refused at once, before any communication)."""
        for r in {c.src, c.dst} - {self.rank}:
            self._refresh_meta(r)
        return self._tensor_info(c.src, c.src_name), self._tensor_info(c.dst, c.dst_name)

    def _check_moved(self, copies: List[Copy]) -> None:
        """Re-register local tensors whose storage moved since register() (e.g. share_memory_()
        or pickling through torch.multiprocessing); peers pick the new address up from READY."""
        names = {c.src_name for c in copies if c.src == self.rank} | {c.dst_name for c in copies if c.dst == self.rank}
        for n in names:
            loc = self._locals.get(n)
            if loc is not None and loc.bytes.data_ptr() != loc.reg_addr:
                log.warning("rank %d: storage of registered tensor %r moved; registering it again", self.rank, n)
                self.register(n, loc.tensor)

    def _info_waiting(self, rank: int, name: str, deadline: float) -> Optional[dict]:
        """Tensor info of (rank, name); waits (until ``deadline``) for a peer's late registration."""
        info = self._tensor_info(rank, name)
        if info is not None or rank == self.rank:
            return info
        delay = 0.002
        while True:
            try:
                self._refresh_meta(rank)
            except (KeyError, RuntimeError):  # the key vanished, or a store hiccup: treat as missing for now
                pass
            info = self._tensor_info(rank, name)
            if info is not None or time.monotonic() >= deadline:
                return info
            self.liveness.check((rank,), what=f"waiting for rank {rank} to register {name!r}")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _eid(self, participants: Tuple[int, ...]) -> str:
        """A name for this execute that every participant computes identically: the participants
        with their incarnations, and how many executes this exact set has run."""
        ident = [(r, self.incarnation if r == self.rank else self._peer_inc[r]) for r in participants]
        h = hashlib.sha1(repr(ident).encode()).hexdigest()[:16]
        n = self._eid_count.get(h, 0) + 1
        self._eid_count[h] = n
        return f"{h}.{n}"

    def _begin(self, copies: Sequence[Copy], timeout_s: float):
        """Validate ``copies``; returns ``(plan, local snapshots)`` when this rank must exchange with
        peers, None when it is done already (not a participant, or the only one: local copies applied)."""
        plan = self._plan(copies, timeout_s)
        if plan is None:
            return None
        snaps = self._snapshot_local(plan)
        if len(plan.participants) == 1:
            self._apply_local(snaps)
            return None
        return plan, snaps

    # ------------------------------------------------------------------ local copies
    def _snapshot_local(self, plan: Plan) -> List[Tuple[Copy, torch.Tensor]]:
        """Copies of the local copies' source rows, taken before anything is written."""
        out = []
        for c in plan.local:
            out.append((c, self._locals[c.src_name].bytes[c.src_row].clone()))
        return out

    def _apply_local(self, snaps: List[Tuple[Copy, torch.Tensor]]) -> None:
        for c, row in snaps:
            self._locals[c.dst_name].bytes[c.dst_row].copy_(row)

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.kind} transport of rank {self.rank} is closed")

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} rank={self.rank} inc={self.incarnation} peers={list(self._peers)} "
                f"tensors={sorted(self._locals)}>")

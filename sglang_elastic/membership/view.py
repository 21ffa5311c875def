"""The membership record and its store keys, plus the small validated helpers server and client share.

A :class:`MembershipView` is what the server publishes once per epoch; :class:`_Keys` names every
key under the membership namespace (the only place those strings are built).
"""
from __future__ import annotations

import datetime
import json
import math
import operator
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch.distributed as dist

__all__ = [
    "DEFAULT_NAMESPACE",
    "HISTORY",
    "MembershipChange",
    "MembershipError",
    "MembershipTimeout",
    "MembershipView",
]

DEFAULT_NAMESPACE = "sglang_elastic/membership"
HISTORY = 128  # versioned records kept in the store


class MembershipError(RuntimeError):
    """The membership store is unreachable, closed or broke; or a membership request failed."""


class MembershipTimeout(MembershipError, TimeoutError):
    """A wait on the membership view ran out of time."""


@dataclass(frozen=True)
class MembershipChange:
    """One entry of a record's change list: ``kind`` is ``joined``, ``failed`` or ``left``."""

    kind: str
    rank: int
    incarnation: int
    reason: str = ""


@dataclass(frozen=True)
class MembershipView:
    """An agreed membership record.

    Attributes:
        epoch: bumped once per published change (0: nobody joined yet).
        live: sorted live rank ids.
        incarnations: for every rank id that ever joined, the incarnation of its live member, or
            of its last member when the rank is dead.
        changes: what this epoch changed (empty for epoch 0).
    """

    epoch: int
    live: Tuple[int, ...]
    incarnations: Mapping[int, int] = field(default_factory=dict)
    changes: Tuple[MembershipChange, ...] = ()

    def is_live(self, rank: int, incarnation: Optional[int] = None) -> bool:
        """``rank`` is live (and, with ``incarnation``, that exact incarnation is the live one)."""
        if rank not in self.live:
            return False
        return incarnation is None or self.incarnations.get(rank) == incarnation

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "live": list(self.live),
            "incarnations": {str(r): i for r, i in sorted(self.incarnations.items())},
            "changes": [[c.kind, c.rank, c.incarnation, c.reason] for c in self.changes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MembershipView":
        return cls(
            epoch=int(d["epoch"]),
            live=tuple(int(r) for r in d["live"]),
            incarnations={int(r): int(i) for r, i in d["incarnations"].items()},
            changes=tuple(MembershipChange(str(k), int(r), int(i), str(why)) for k, r, i, why in d["changes"]),
        )

    @classmethod
    def from_json(cls, raw: Union[str, bytes]) -> "MembershipView":
        return cls.from_dict(json.loads(raw))

    def feed(self, liveness: Any) -> None:
        """Tell a :class:`~sglang_elastic.transport.Liveness` what this record changed: its deaths,
        and rejoins under a new incarnation (server and client feed theirs the same way)."""
        for c in self.changes:
            if c.kind == "failed":
                liveness.mark_dead(c.rank, f"membership epoch {self.epoch}: {c.reason}", c.incarnation)
            elif c.kind == "joined":
                liveness.mark_alive(c.rank, c.incarnation)


class _Keys:
    """Every store key of one membership namespace."""

    def __init__(self, namespace: str) -> None:
        ns = namespace.rstrip("/")
        self.config = f"{ns}/config"
        self.epoch = f"{ns}/epoch"
        self.view = f"{ns}/view"
        self.requests = f"{ns}/requests"
        self._ns = ns

    def view_at(self, epoch: int) -> str:
        return f"{self._ns}/view/{epoch}"

    def incarnation(self, rank: int) -> str:
        return f"{self._ns}/inc/{rank}"

    def heartbeat(self, rank: int, incarnation: int) -> str:
        return f"{self._ns}/hb/{rank}/{incarnation}"


def _check_rank(rank: Any, what: str = "rank") -> int:
    if isinstance(rank, bool):
        raise ValueError(f"{what} must be a non-negative integer, got {rank!r}")
    try:
        r = operator.index(rank)
    except TypeError:
        raise ValueError(f"{what} must be a non-negative integer, got {rank!r}") from None
    if r < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {r}")
    return r


def _check_port(port: Any) -> int:
    p = _check_rank(port, "port")
    if p > 65535:
        raise ValueError(f"port must be in [0, 65535], got {p}")
    return p


def _check_positive(x: Any, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number of seconds, got {x!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{what} must be a positive number of seconds, got {x!r}")
    return v


def _as_predicate(x: Union[int, Callable[[MembershipView], bool]]) -> Callable[[MembershipView], bool]:
    if callable(x):
        return x
    if isinstance(x, bool):
        raise ValueError(f"expected an epoch number or a predicate, got {x!r}")
    n = operator.index(x)
    return lambda v: v.epoch >= n


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# torch raises RuntimeError subclasses (DistStoreError, DistNetworkError) or OSError from a store
STORE_ERRORS = (RuntimeError, OSError, ValueError)


def _open_master(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    td = datetime.timedelta(seconds=timeout_s)

    def make(p: int) -> dist.TCPStore:
        return dist.TCPStore(host, p, world_size=None, is_master=True, timeout=td, wait_for_workers=False)

    if port:
        try:
            return make(port)
        except STORE_ERRORS as e:
            raise MembershipError(f"cannot serve the membership store on {host}:{port}: {e}") from e
    try:  # port 0 works for the master on recent torch; otherwise bind a free port ourselves
        store = make(0)
        if store.port > 0:
            return store
        del store
    except STORE_ERRORS:
        pass  # old torch: fall through to binding a free port ourselves
    last: Optional[Exception] = None
    for _ in range(5):
        try:
            return make(_free_port(host))
        except STORE_ERRORS as e:  # lost a race for the port
            last = e
    raise MembershipError(f"cannot serve the membership store on {host} (no free port): {last}")


def _connect(host: str, port: int, connect_timeout_s: float, store_timeout_s: float) -> dist.TCPStore:
    """A client store, or MembershipError within about ``connect_timeout_s``."""
    deadline = time.monotonic() + connect_timeout_s
    while True:  # probe first: TCPStore's own connect retries for up to ~2.5x its timeout
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, remaining))):
                break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise MembershipError(
                    f"membership store at {host}:{port} is unreachable after {connect_timeout_s:g} s "
                    f"({e}); is the MembershipServer running?") from e
            time.sleep(0.05)
    try:
        return dist.TCPStore(host, port, world_size=None, is_master=False,
                             timeout=datetime.timedelta(seconds=store_timeout_s), wait_for_workers=False)
    except STORE_ERRORS as e:
        raise MembershipError(f"cannot connect to the membership store at {host}:{port}: {e}") from e

"""Agreement between ranks through a store served outside them, ended by knowledge.

The vote polls the store and, between polls, consults the process's
:class:`~sglang_elastic.transport.Liveness`: when a rank it waits for is known dead (the membership
client pushes deaths within milliseconds of a kill), the wait ends at once with
:class:`~sglang_elastic.transport.PeerFailure` naming it. Timeouts remain only for ranks that are
alive but silent (frozen, partitioned). A plain wait for a store key with the same contract is
:func:`sglang_elastic.transport.store_wait`.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional, Tuple

from ..transport.base import PeerFailure
from ..transport.liveness import Liveness

log = logging.getLogger(__name__)

__all__ = ["StoreVote"]

_POLL_MIN_S = 0.0005  # first polls are tight: posts of healthy ranks land within a millisecond or two
_POLL_MAX_S = 0.01    # then back off, so several ranks polling one store cost little
_DEAD = "dead:"       # prefix of a verdict written in place of a voter's post
_VIEW = " over "      # a post is "<ok | suspected ranks> over <the live ranks it voted over>"


def _parse(post: str) -> Tuple[str, Optional[set]]:
    """``(outcome, live set the voter ran over)`` of a post (``None``: a post without one)."""
    outcome, sep, view = post.partition(_VIEW)
    return outcome, ({int(r) for r in view.split(",") if r} if sep else None)


def _sleep(liveness: Liveness, delay: float, version: int) -> None:
    """Sleep ``delay`` seconds, or less when the liveness learns of a death."""
    liveness.wait(delay, since_version=version)


class StoreVote:
    """Agreement on a chunk's outcome through a store served outside the ranks.

    Each live rank posts ``ok`` or the ranks it suspects under ``<prefix>/<seq>/<rank>``; every rank
    then reads every live rank's post. A rank known dead (the :attr:`liveness`) or silent for
    ``timeout_s`` gets a *verdict* written in place of its post with an atomic compare-and-set:
    either its post was there first (then it is alive, even if a neighbour suspected it: a frozen
    peer makes timeouts cascade, so suspicions are not proof) or the verdict is, and every rank
    reads the same value. So all ranks reach the same outcome: commit only when every live rank
    posted ``ok``. Without this, a rank that never talked to the dead peer would commit a chunk its
    neighbours abandon. A post also names the live set its voter ran over: voters whose sets differ
    (one has agreed with membership on a death the others have not learnt yet) all get the ranks
    not in every set as dead, so they recover together.

    Args:
        store: the store (``compare_set``, ``check``, ``get``, ``multi_get``).
        rank: this rank.
        timeout_s: bound for a voter that is alive but silent.
        prefix: key prefix (one namespace per membership generation).
        liveness: this process's :class:`Liveness`; ``None`` until an updater lends its own
            (see :class:`~sglang_elastic.location.updater.ExpertLocationUpdater`).
    """

    def __init__(self, store, rank: int, timeout_s: float, prefix: str = "sgle/update", *,
                 liveness: Optional[Liveness] = None) -> None:
        self.store, self.rank, self.timeout_s, self.prefix = store, rank, timeout_s, prefix
        self.liveness = liveness
        self._private = Liveness()

    def __call__(self, seq: str, live: List[int], failed: List[int]) -> Tuple[List[int], bool]:
        """Post this rank's outcome and read everyone's: ``(dead, all_ok)``, the same on every rank.

        Returns as soon as one voter is found dead (known dead, or silent past ``timeout_s``):
        the chunk is abandoned by every rank either way.
        """
        lv = self.liveness if self.liveness is not None else self._private
        key = f"{self.prefix}/{seq}"
        mine = (",".join(map(str, failed)) if failed else "ok") + _VIEW + ",".join(str(int(r)) for r in sorted(live))
        posts = {}
        got = self.store.compare_set(f"{key}/{self.rank}", "", mine).decode()
        if got.startswith(_DEAD):  # the others already gave up on this rank: abandon with them
            return [self.rank], False
        posts[self.rank] = got
        pending = [int(r) for r in live if int(r) != self.rank]
        deadline = time.monotonic() + float(self.timeout_s)
        delay = _POLL_MIN_S
        while pending:
            version = lv.version
            keys = [f"{key}/{r}" for r in pending]
            if self.store.check(keys):
                for r, v in zip(pending, self.store.multi_get(keys)):
                    posts[r] = v.decode()
                pending = []
                break
            if self.store.check(keys[:1]):  # progress in order: the first pending voter posted
                posts[pending[0]] = v = self.store.get(keys[0]).decode()
                if v.startswith(_DEAD):  # another rank's verdict: it is dead for everyone
                    return [pending[0]], False
                pending.pop(0)
                delay = _POLL_MIN_S
                continue
            timed_out = time.monotonic() >= deadline
            suspects = pending if timed_out else [r for r in pending if lv.is_dead(r)]
            if suspects:
                why = "silent for the vote's timeout" if timed_out else f"dead ({lv.reason(suspects[0])})"
                if timed_out:
                    log.warning("rank %d: vote %s: ranks %s silent for %g s", self.rank, key, suspects, self.timeout_s)
                dead = []
                for r in suspects:
                    v = self.store.compare_set(f"{key}/{r}", "", f"{_DEAD}{why}").decode()
                    posts[r] = v
                    if v.startswith(_DEAD):
                        dead.append(r)
                if dead:
                    return sorted(dead), False
                pending = [r for r in pending if r not in posts]  # they had posted after all
                continue
            _sleep(lv, min(delay, max(0.0, deadline - time.monotonic())), version)
            delay = min(delay * 2, _POLL_MAX_S)
        dead = sorted(r for r, v in posts.items() if v.startswith(_DEAD))
        if dead:
            return dead, False
        outcomes, views = zip(*(_parse(v) for v in posts.values()))
        views = [v for v in views if v is not None]
        differ = set().union(*views) - set.intersection(*views) if views else set()
        if differ:
            # The voters ran this collective over different live sets: some already agreed with
            # membership that these ranks are gone (e.g. a joiner whose connect found one dead),
            # the others have not yet learnt it. To both sides they are the failure: every voter
            # recovers through membership together, instead of some retrying a collective the
            # others have left (a 6-rank nixl soak stalled that way).
            return sorted(differ), False
        return [], all(o == "ok" for o in outcomes)

    def agree(self, seq: str, live: List[int], failed: List[int]) -> bool:
        """Like calling the vote, but a dead voter raises :class:`PeerFailure` naming it (all the
        dead ones in ``ranks``); returns whether every live rank posted ``ok``."""
        dead, all_ok = self(seq, live, failed)
        if dead:
            raise PeerFailure(dead[0], f"rank {dead[0]} is dead (vote {self.prefix}/{seq})", ranks=dead)
        return all_ok

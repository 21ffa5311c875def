"""Shared pieces of the updater tests (test_updater.py, test_zero_stall.py): a small placement whose
expert weights are recognisable values, and exact checks of what each slot holds."""
import socket

import torch

from sglang_elastic.eplb import Placement, rebalance
from sglang_elastic.eplb.synthetic import drift, synthetic_load

L, E, R, S, D = 4, 12, 4, 5, 16  # layers, experts, ranks, slots per rank, floats per expert


def expert_value(layer: int, expert: int) -> torch.Tensor:
    """The weights of ``expert`` of ``layer``: distinct in every element, so a copy is checked bit for bit."""
    return torch.arange(D, dtype=torch.float64) + 1000.0 * (layer * E + expert)


def weights_for(placement: Placement, rank: int) -> torch.Tensor:
    """``[L, S, D]`` weights of ``rank`` under ``placement`` (NaN in empty slots)."""
    w = torch.full((L, S, D), float("nan"), dtype=torch.float64)
    for l in range(L):
        for s in range(S):
            e = int(placement.phy2log[l, rank * S + s])
            if e >= 0:
                w[l, s] = expert_value(l, e)
    return w


def wrong_slots(w: torch.Tensor, placement: Placement, rank: int) -> list:
    """``(layer, slot, expert, "holds", expert found)`` for every slot not holding its placement's expert."""
    bad = []
    for l in range(L):
        for s in range(S):
            e = int(placement.phy2log[l, rank * S + s])
            if e >= 0 and not torch.equal(w[l, s], expert_value(l, e)):
                bad.append((l, s, e, "holds", _expert_in(w[l, s], l)))
    return bad


def _expert_in(row: torch.Tensor, layer: int):
    """Which expert of ``layer`` ``row`` holds, by :func:`expert_value`'s first element (``None``: NaN, empty)."""
    got = row[0].item()
    return None if got != got else int(got // 1000) - layer * E


def wrong_backups(upd, rank: int) -> list:
    """``(layer, expert, row, "holds", expert found)`` for every backup row ``rank`` holds (by the
    updater's layout) whose bytes are not its expert's: a restore from it would serve wrong weights."""
    layout = upd.backup_layout
    if layout is None:
        return []
    bad = []
    for l, e in (layout.holder == rank).nonzero().tolist():
        r = int(layout.row[l, e])
        got = upd._backup["w"][r]
        if not torch.equal(got, expert_value(l, e)):
            bad.append((l, e, r, "holds", _expert_in(got, l)))
    return bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placements(seed: int):
    """``(load, before, after)``: a balanced placement and a movement-aware one for a drifted load."""
    w0 = synthetic_load("lognormal1", L, E, seed=seed)
    p0 = rebalance(w0, R, S)
    w1 = drift(w0, 0.4, seed=seed + 1)
    p1 = rebalance(w1, R, S, current=p0, balance_tolerance=0.0)
    return w1, p0, p1


def agreed_failure_hook(member, load, current, record: list):
    """``on_failure`` for an updater: report the dead to membership, wait for the agreed view and
    re-plan over it (deterministic, so every survivor gets the same target); ``record`` gets each
    call's dead ranks."""
    import numpy as np

    def on_failure(dead):
        record.append(sorted(dead))
        for d in dead:  # tell membership; it decides, and every survivor sees the same verdict
            member.report_dead(d, "updater PeerFailure")
        view = member.wait_for_epoch(lambda v: not set(dead) & set(v.live), timeout=60)
        live = np.zeros(R, dtype=bool)
        live[list(view.live)] = True
        return live, rebalance(load, R, S, live_ranks=live, current=current)

    return on_failure


def stop_cluster(procs, membership, timeout: float = 10) -> None:
    """Join the rank processes (killing any left), then stop the membership server."""
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    membership.close()

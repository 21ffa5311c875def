"""location/repair.py: a target over dead ranks is repaired over the live ones; lost experts are
exactly those with no live replica and no live backup, found to a fixed point."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_elastic.eplb.placement import Placement
from sglang_elastic.location.repair import lost_experts, lost_on_rank, repair_target


def _p(rows, R, E):
    return Placement(torch.tensor([rows]), R, E)


def test_valid_target_is_returned_unchanged():
    t = _p([0, 1, 2, 3, 0, 1], 3, 4)
    out, repaired = repair_target(t, np.array([True, True, True]))
    assert not repaired and out is t


def test_target_using_a_dead_rank_is_repaired_over_live_ranks_keeping_live_slots():
    # rank 2 (slots 4, 5) is dead; expert 3 lived only there
    t = _p([0, 1, 2, 3, 3, 1], 3, 4)
    live = np.array([True, True, False])
    out, repaired = repair_target(t, live, load=torch.tensor([[1.0, 1.0, 1.0, 5.0]]))
    assert repaired
    out.validate(live)
    p = out.phy2log[0]
    assert p[4:].tolist() == [-1, -1]
    assert set(p[:4].tolist()) == {0, 1, 2, 3}
    # movement-aware: few slots of the live ranks change to bring expert 3 back
    assert int((p[:4] != t.phy2log[0, :4]).sum()) <= 2


def _reference_lost(committed, target, live, holder, S):
    """The adapter's former loop, kept as the reference."""
    lost, cur = [], committed.clone()
    live_slot = torch.from_numpy(np.repeat(live, S))
    while True:
        have = set(cur[live_slot & (cur >= 0)].tolist())
        more = [e for e in sorted(set(target[target >= 0].tolist()) - have)
                if holder is None or int(holder[e]) < 0 or not live[int(holder[e])]]
        if not more:
            return lost, cur
        lost.extend(more)
        hit = torch.isin(target, torch.tensor(more)) & live_slot
        cur[hit] = target[hit]


@pytest.mark.parametrize("seed", range(40))
def test_lost_experts_match_the_reference(seed):
    g = np.random.default_rng(seed)
    R, S, E = int(g.integers(2, 5)), int(g.integers(1, 4)), int(g.integers(2, 9))
    P = R * S
    live = g.random(R) < 0.6
    live[g.integers(R)] = True
    committed = torch.from_numpy(g.integers(0, E, P))
    committed.view(R, S)[torch.from_numpy(~live)] = -1
    target = torch.from_numpy(g.integers(0, E, P))
    target.view(R, S)[torch.from_numpy(~live)] = -1
    holder = None if seed % 3 == 0 else torch.from_numpy(g.integers(-1, R, E))
    lost, cur = lost_experts(committed, target, live, holder, E)
    ref_lost, ref_cur = _reference_lost(committed, target, live, holder, S)
    assert lost == sorted(ref_lost)
    assert torch.equal(cur, ref_cur)
    assert torch.equal(committed, committed.clone())  # input untouched


def test_lost_experts_cascade_through_overwritten_sources():
    # two live ranks of 2 slots, rank 2 dead. Expert 4 is lost (no replica, no backup); its target
    # slot held expert 1's only replica, so expert 1 is lost too.
    live = np.array([True, True, False])
    committed = torch.tensor([0, 1, 2, 3, -1, -1])
    target = torch.tensor([0, 4, 1, 3, -1, -1])
    lost, cur = lost_experts(committed, target, live, None, 5)
    assert lost == [1, 4]
    assert cur.tolist() == [0, 4, 1, 3, -1, -1]
    # with a live backup of expert 1 only expert 4 is lost (2 has no backup and no target slot)
    holder = torch.tensor([-1, 0, -1, -1, -1])
    lost, _ = lost_experts(committed, target, live, holder, 5)
    assert lost == [4]


def test_lost_on_rank_is_the_lost_experts_in_its_slots():
    target = torch.tensor([0, 4, 1, 3, -1, -1])
    assert lost_on_rank(target, [1, 4], rank=0, slots_per_rank=2) == [4]
    assert lost_on_rank(target, [1, 4], rank=1, slots_per_rank=2) == [1]
    assert lost_on_rank(target, [], rank=1, slots_per_rank=2) == []

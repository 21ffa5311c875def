"""Backup layout (pure): every expert backed up once, on a live rank that does not serve it, on
another node when possible, rows unique and balanced; re-homing keeps what survived."""
import numpy as np
import pytest

from sglang_elastic.eplb import rebalance
from sglang_elastic.eplb.synthetic import synthetic_load
from sglang_elastic.location.backup import assign_backups


def _check(layout, placement, live, rpn):
    holder, row = layout.holder.numpy(), layout.row.numpy()
    L, E = holder.shape
    x = placement.by_rank().numpy()
    assert (holder >= 0).all() and live[holder].all()
    # rows unique per holder and within capacity
    pairs = set(zip(holder.ravel().tolist(), row.ravel().tolist()))
    assert len(pairs) == L * E
    assert row.max() < layout.rows_per_rank
    serves = 0
    same_node = 0
    for l in range(L):
        for e in range(E):
            h = holder[l, e]
            serves += e in x[l, h]
            replica_nodes = {r // rpn for r in range(placement.num_ranks) if e in x[l, r]}
            same_node += (h // rpn) in replica_nodes
    return serves, same_node


def test_backups_avoid_serving_ranks_and_nodes():
    w = synthetic_load("lognormal1", 4, 64, seed=0)
    p = rebalance(w, 16, 6, ranks_per_node=4)
    live = np.ones(16, bool)
    layout = assign_backups(p, live, ranks_per_node=4)
    serves, same_node = _check(layout, p, live, 4)
    assert serves == 0
    # With 4 nodes and at most a few replicas per expert, another node almost always exists.
    assert same_node <= 4 * 64 // 20
    used = np.bincount(layout.holder.numpy().ravel(), minlength=16)
    assert used.max() - used.min() <= 2, used
    assert layout.bytes_per_rank(1000) == layout.rows_per_rank * 1000


def test_rehoming_keeps_live_holders_and_moves_only_dead_ones():
    w = synthetic_load("hot", 3, 32, seed=1)
    p = rebalance(w, 8, 6, ranks_per_node=2)
    first = assign_backups(p, None, ranks_per_node=2)
    live = np.ones(8, bool)
    live[[3, 6]] = False
    q = rebalance(w, 8, 6, live_ranks=live, ranks_per_node=2, current=p)
    second = assign_backups(q, live, ranks_per_node=2, previous=first, rows_per_rank=first.rows_per_rank)
    h1, h2 = first.holder.numpy(), second.holder.numpy()
    x = q.by_rank().numpy()
    serves = np.array([[e in x[l, h1[l, e]] for e in range(32)] for l in range(3)])
    kept = live[h1] & ~serves
    assert kept.any() and (~kept).any()
    assert (h2[kept] == h1[kept]).all() and (second.row.numpy()[kept] == first.row.numpy()[kept]).all()
    assert live[h2].all()
    # Nothing is backed up on a rank that serves the expert (one failure must not take both).
    assert not np.array([[e in x[l, h2[l, e]] for e in range(32)] for l in range(3)]).any()


def test_backup_store_full_is_a_clear_error():
    w = synthetic_load("uniform", 2, 16, seed=0)
    p = rebalance(w, 4, 8)
    with pytest.raises(ValueError, match="backup store full"):
        assign_backups(p, None, rows_per_rank=2)


def test_backup_shortfall_degrades_covering_the_most_exposed_experts_first():
    """Too few rows (ranks died): a serving rank's layout covers experts with the fewest live
    replicas first, leaves the rest without a backup and counts them, instead of raising."""
    w = synthetic_load("hot", 2, 16, seed=3)
    p = rebalance(w, 4, 8)
    live = np.array([True, True, True, False])
    layout = assign_backups(p, live, rows_per_rank=3, degrade=True)
    holder = layout.holder.numpy()
    x = p.by_rank().numpy()
    replicas = np.array([[sum(int((x[l, r] == e).sum()) for r in range(4) if live[r]) for e in range(16)]
                         for l in range(2)])
    covered, bare = holder >= 0, holder < 0
    assert layout.uncovered == int(bare.sum()) > 0 and covered.sum() == 3 * 3
    assert live[holder[covered]].all()
    exposed = np.where(replicas > 0, replicas, 10 ** 6)  # experts with no live replica come last
    assert exposed[covered].max() <= exposed[bare].min()
    assert (replicas[covered] == 1).any()

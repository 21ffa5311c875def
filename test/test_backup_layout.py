"""Backup layout (pure): every expert backed up once, on a live rank that does not serve it, on
another node when possible, rows unique and balanced; re-homing keeps what survived."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sglang_elastic.eplb import Placement, rebalance
from sglang_elastic.eplb.synthetic import synthetic_load
from sglang_elastic.location.backup import BackupLayout, assign_backups


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
    nodes = [[{r // 2 for r in range(8) if live[r] and e in x[l, r]} for e in range(32)] for l in range(3)]
    only_node = np.array([[nodes[l][e] == {h1[l, e] // 2} for e in range(32)] for l in range(3)])
    kept = live[h1] & ~serves & ~only_node
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


def _survives_any_node(layout, placement, live, rpn):
    """Every expert served by a live rank keeps a live replica or a live backup when any one node dies."""
    x = placement.by_rank().numpy()                              # [L, R, S]
    holder = layout.holder.numpy()
    L, E = holder.shape
    R = placement.num_ranks
    for n in range(R // rpn):
        alive = live.copy()
        alive[n * rpn:(n + 1) * rpn] = False
        for l in range(L):
            served_before = {int(e) for r in range(R) if live[r] for e in x[l, r] if e >= 0}
            served_after = {int(e) for r in range(R) if alive[r] for e in x[l, r] if e >= 0}
            for e in served_before - served_after:
                h = holder[l, e]
                assert h >= 0 and alive[h], f"node {n} takes expert {e} of layer {l} and its backup (rank {h})"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_one_node_loss_never_loses_an_expert(data):
    """Property: for any placement with ranks_per_node, after assign_backups (fresh, or re-homed from
    a previous layout of another placement), killing any one node leaves every expert a live replica
    or a live backup, whenever the rows suffice."""
    rpn = data.draw(st.sampled_from([2, 3, 4]))
    nodes = data.draw(st.integers(2, 4))
    R, L = rpn * nodes, data.draw(st.integers(1, 3))
    S = data.draw(st.integers(2, 6))
    E = data.draw(st.integers(2, R * S))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)

    def random_placement():
        phy = np.empty((L, R * S), dtype=np.int64)
        for l in range(L):  # every expert once, the rest random replicas (possibly crowded on one node)
            phy[l] = np.concatenate([rng.permutation(E), rng.integers(0, E, R * S - E)])
            if rng.random() < 0.5:
                phy[l] = np.sort(phy[l])  # experts packed by node: many single-node experts
        return Placement(torch.from_numpy(phy), R, E)

    live = np.ones(R, bool)
    first = random_placement()
    layout = assign_backups(first, live, ranks_per_node=rpn, degrade=True)
    assert layout.uncovered == 0
    _survives_any_node(layout, first, live, rpn)
    second = random_placement()
    again = assign_backups(second, live, ranks_per_node=rpn, previous=layout, rows_per_rank=layout.rows_per_rank,
                           degrade=True)
    if again.uncovered == 0:
        _survives_any_node(again, second, live, rpn)


def test_kept_backup_leaves_the_only_node_serving_its_expert():
    """From the fault matrix (kill_node): a backup kept from ``previous=`` on rank 0 while expert 0 is
    now served only by rank 1, of the same node, moves to the other node (a node loss took both)."""
    # 2 nodes x 2 ranks x 2 slots, one layer, 4 experts; expert 0 only on rank 1 (node 0).
    after = Placement(torch.tensor([[1, 2, 0, 3, 1, 2, 3, 1]]), 4, 4)
    previous = BackupLayout(torch.tensor([[0, 0, 3, 0]]), torch.tensor([[0, 1, 0, 2]]), 8)
    kept = assign_backups(after, None, ranks_per_node=2, previous=previous, rows_per_rank=8)
    assert int(kept.holder[0, 0]) // 2 == 1
    assert int(kept.holder[0, 3]) == 0  # rank 0 does not serve 3 and node 1 serves it too: kept


def test_a_backup_given_another_row_on_its_holder_is_refilled():
    """A pair kept on its holder but moved to another row reads another pair's bytes there (or none):
    it needs a copy like a pair that changed holder. (Both re-homings once compared holders only,
    and a restore from such a row served another expert's weights.)"""
    from sglang_elastic.location.backup import BackupLayout

    prev = BackupLayout(torch.tensor([[1, 2, -1, 3]]), torch.tensor([[0, 0, -1, 4]]), 8)
    new = BackupLayout(torch.tensor([[1, 2, 0, -1]]), torch.tensor([[0, 5, 1, -1]]), 8)
    assert new.refills(prev).tolist() == [[False, True, True, False]]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_rehoming_keeps_rows_of_pairs_back_on_their_holder(data):
    """Re-homing onto the same holder keeps the pair's row where the holder has room (no copy needed);
    whatever the layout, the pairs needing a copy are exactly those whose (holder, row) changed, and
    rows stay unique."""
    L, E, R = 2, data.draw(st.integers(6, 16)), data.draw(st.integers(3, 6))
    S = -(-E // R) + data.draw(st.integers(0, 2))
    w = synthetic_load("lognormal1", L, E, seed=data.draw(st.integers(0, 99)))
    p = rebalance(w, R, S)
    cap = data.draw(st.integers(-(-L * E // R), L * E))
    first = assign_backups(p, None, rows_per_rank=cap, degrade=True)
    live = np.ones(R, bool)
    live[data.draw(st.integers(0, R - 1))] = False
    if live.sum() * S < E:
        return
    q = rebalance(w, R, S, live_ranks=live, current=p)
    second = assign_backups(q, live, previous=first, rows_per_rank=cap, degrade=True)
    h1, r1, h2, r2 = first.holder, first.row, second.holder, second.row
    same = (h2 == h1) & (h2 >= 0)
    if cap >= L * E:  # with room on every holder, a pair back on its holder keeps its row (no copy)
        assert (r2[same] == r1[same]).all()
    assert torch.equal(second.refills(first), (h2 >= 0) & ((h2 != h1) | (r2 != r1)))
    rows = list(zip(h2[h2 >= 0].tolist(), r2[h2 >= 0].tolist()))
    assert len(rows) == len(set(rows)) and all(0 <= r < cap for _, r in rows)

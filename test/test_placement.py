"""Placement: derived maps, validation, SGLang formats and files, and the metrics of DESIGN.md."""
import json

import numpy as np
import pytest
import torch

from sglang_elastic.eplb import (
    Placement,
    PlacementError,
    balancedness,
    layer_balancedness,
    load_placement_file,
    movement,
    movement_bytes,
    orphans,
    rank_load,
    save_placement_file,
)


def _p(rows, num_ranks, num_experts):
    return Placement(torch.tensor(rows), num_ranks, num_experts)


def test_derived_maps_match_phy2log():
    # 3 ranks x 2 slots, rank 1 dead; expert 0 has two replicas.
    p = _p([[0, 1, -1, -1, 2, 0]], 3, 3)
    assert p.slots_per_rank == 2 and p.num_layers == 1
    assert p.live_ranks.tolist() == [True, False, True]
    assert p.logcnt.tolist() == [[2, 1, 1]]
    assert p.log2phy.tolist() == [[[0, 5], [1, -1], [4, -1]]]
    p.validate([1, 0, 1])


def test_log2phy_is_inverse_of_phy2log_on_random_placements():
    rng = np.random.default_rng(0)
    for _ in range(20):
        L, R, S, E = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 5), rng.integers(1, 8)
        phy = rng.integers(0, E, size=(L, R * S))
        dead = rng.random(R) < 0.3
        phy.reshape(L, R, S)[:, dead] = -1
        p = Placement(torch.from_numpy(phy), int(R), int(E))
        l2p, cnt = p.log2phy, p.logcnt
        for l in range(L):
            for e in range(E):
                slots = [s for s in l2p[l, e].tolist() if s >= 0]
                assert slots == sorted(np.flatnonzero(phy[l] == e).tolist())
                assert cnt[l, e] == len(slots)


@pytest.mark.parametrize(
    "rows, live, message",
    [
        ([[0, 5, 1, 2]], None, r"outside \[-1, 3\)"),
        ([[0, -1, 1, 2]], None, "rank 0 in layer 0 mixes dead"),
        ([[0, 0, 1, 1]], None, "logical expert 2 has no replica"),
        ([[0, 0, 1, 2]], None, "rank 0 holds logical expert 0 twice"),
        ([[0, 1, 2, 0]], [1, 0], "rank 1 is dead but the placement routes to its slots"),
        ([[-1, -1, 0, 1], [2, 1, 0, 1]], None, "dead in some layers"),
    ],
)
def test_validate_names_the_problem(rows, live, message):
    with pytest.raises(PlacementError, match=message):
        _p(rows, 2, 3).validate(live)


def test_constructor_rejects_bad_shapes():
    with pytest.raises(PlacementError, match="2-D"):
        Placement(torch.zeros(4, dtype=torch.int64), 2, 2)
    with pytest.raises(PlacementError, match="split evenly"):
        Placement(torch.zeros(1, 5, dtype=torch.int64), 2, 2)
    with pytest.raises(PlacementError, match="integer"):
        Placement(torch.zeros(1, 4), 2, 2)


def test_sglang_triple_hides_dead_slots_and_round_trips():
    p = _p([[0, 1, -1, -1, 2, 0], [2, 1, -1, -1, 0, 1]], 3, 3).validate()
    p2l, l2p, cnt = p.to_sglang()
    assert (p2l >= 0).all(), "SGLang indexes with physical_to_logical_map: no -1 allowed"
    assert not torch.isin(l2p, torch.tensor([2, 3])).any(), "dead slots must not be routable"
    assert torch.equal(cnt, p.logcnt)
    back = Placement.from_sglang(p2l, 3, 3, live_ranks=[1, 0, 1])
    assert torch.equal(back.phy2log, p.phy2log)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_files_round_trip_in_sglang_init_expert_location_format(tmp_path, suffix):
    p = _p([[0, 1, 2, 3], [3, 2, 1, 0]], 2, 4).validate()
    path = tmp_path / f"placement{suffix}"
    save_placement_file(p, path)
    data = json.loads(path.read_text()) if suffix == ".json" else torch.load(path, weights_only=True)
    # SGLang passes the keys to ExpertLocationMetadata.init_by_mapping(**data): exactly one key.
    assert list(data) == ["physical_to_logical_map"]
    assert torch.equal(load_placement_file(path, 2, 4).phy2log, p.phy2log)


def test_placement_file_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(PlacementError, match="cannot read placement file"):
        load_placement_file(bad_json, 2)
    wrong_key = tmp_path / "wrong.json"
    wrong_key.write_text(json.dumps({"logical_count": [[1, 2]]}))
    with pytest.raises(PlacementError, match="expected a 'physical_to_logical_map' entry"):
        load_placement_file(wrong_key, 2)
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"physical_to_logical_map": [[0, 1], [0]]}))
    with pytest.raises(PlacementError, match="rectangular"):
        load_placement_file(ragged, 2)
    with pytest.raises(PlacementError, match=r"must end in \.json or \.pt"):
        load_placement_file(tmp_path / "p.txt", 2)
    with pytest.raises(PlacementError, match="cannot read"):
        load_placement_file(tmp_path / "missing.json", 2)


def test_metrics_by_hand():
    # 2 ranks x 2 slots. Expert 0 (load 6) has replicas on both ranks: 3 tokens each.
    p = _p([[0, 1, 0, 2]], 2, 3)
    w = np.array([[6.0, 4.0, 2.0]])
    assert rank_load(w, p).tolist() == [[7.0, 5.0]]
    assert balancedness(w, p) == pytest.approx(6.0 / 7.0)
    assert layer_balancedness(w, p).tolist() == pytest.approx([6.0 / 7.0])
    # [steps, L, E] loads are summed over steps.
    assert balancedness(np.stack([w / 2, w / 2]), p) == pytest.approx(6.0 / 7.0)


def test_balancedness_ignores_dead_ranks():
    p = _p([[0, 1, -1, -1, 2, 0]], 3, 3)
    w = np.array([[2.0, 1.0, 1.0]])
    tok = rank_load(w, p)
    assert np.isnan(tok[0, 1])
    assert balancedness(w, p) == pytest.approx(2.0 / 2.0)


def test_movement_counts_only_fetched_experts_on_ranks_live_in_both():
    old = _p([[0, 1, 2, 3, 4, 5]], 3, 6)
    # rank 0 swaps its two slots (free: both experts were already there); on rank 1 expert 4
    # replaces 3 (fetched: 1 movement); rank 2 dies and is not counted.
    new = _p([[1, 0, 2, 4, -1, -1]], 3, 6)
    assert movement(old, new) == 1
    assert movement_bytes(old, new, 1000) == 1000
    # A rank that joins is not "live in both": its fills are not movement by definition.
    grow = _p([[0, 1, -1, -1]], 2, 2)
    assert movement(grow, _p([[0, 1, 1, 0]], 2, 2)) == 0


def test_orphans_are_experts_without_a_live_replica():
    p = _p([[0, 1, 2, 0, 3, 1]], 3, 4)
    assert orphans(p).sum() == 0
    lost = orphans(p, live_ranks=[1, 1, 0])
    assert lost.tolist() == [[False, False, False, True]]

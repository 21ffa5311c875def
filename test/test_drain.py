"""Drain (scale-down) core: request checks, the movement-aware plan, and a drain run through the
controller and the scheduler side over our elastic state while a serving loop keeps routing tokens
(every token must reach a slot holding its expert on a rank that is not masked: no request lost).

The weight movement is simulated in one process (SGLang's update entry point needs a GPU model);
the SGLang HTTP routes are tested on SGLang's own FastAPI app in test_sglang_plugin.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sglang_elastic.eplb.algorithms import rebalance
from sglang_elastic.eplb.placement import Placement
from sglang_elastic.sglang_plugin.drain import (ClusterView, DrainController, DrainError, SchedulerDrain,
                                                check_drain, parse_drain_request, plan_drain)
from sglang_elastic.state import ElasticEPState

L, E, R, S, D = 6, 12, 4, 4, 8


@pytest.mark.parametrize("body, status, message", [
    ([1], 400, "must be a JSON object"),
    ({"rank": [1]}, 400, "unknown field 'rank'"),
    ({"ranks": []}, 400, "non-empty list"),
    ({"ranks": [1, "2"]}, 400, "must hold integers, got '2'"),
    ({"ranks": [True]}, 400, "must hold integers, got True"),
])
def test_bad_bodies(body, status, message):
    with pytest.raises(DrainError) as e:
        parse_drain_request(body)
    assert e.value.status == status and message in e.value.message


def test_check_drain():
    view = ClusterView(ep_size=4, live=(0, 1, 2), slots_per_rank=6, num_logical=12)
    assert parse_drain_request({"ranks": [2, 1, 2]}) == [1, 2]
    assert check_drain([2], view) == [2]
    assert check_drain([3], view) == []  # already dead: nothing to drain
    with pytest.raises(DrainError, match=r"rank 4 is not an EP rank: ranks are 0..3") as e:
        check_drain([4], view)
    assert e.value.status == 400
    with pytest.raises(DrainError, match=r"leaves 1 live ranks x 6 slots = 6 slots, fewer than the 12") as e:
        check_drain([0, 1], view)
    assert e.value.status == 422
    with pytest.raises(DrainError, match="would leave no live rank"):
        check_drain([0, 1, 2], ClusterView(4, (0, 1, 2), 12, 12))


def test_plan_keeps_survivors_and_empties_the_leaving_ranks():
    w = torch.from_numpy(np.random.default_rng(0).integers(1, 100, (L, E)).astype(np.float64))
    cur = rebalance(w, R, S)
    p2l = cur.to_sglang()[0]
    live = np.ones(R, dtype=bool)
    new = plan_drain(p2l, live, [3], E, w)
    stay = np.array([True, True, True, False])
    new.validate(stay)
    assert (new.by_rank()[:, 3] == -1).all()
    kept = (new.phy2log[:, : 3 * S] == cur.phy2log[:, : 3 * S]).float().mean()
    assert kept > 0.5  # movement-aware: most of the survivors' slots stay


class SimCluster:
    """R ranks' expert weights in one process, SGLang's committed metadata per layer, and a serving
    loop; forward passes and chunk updates take turns (as in SGLang's scheduler loop)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.experts = torch.randn(L, E, D, generator=g)
        self.state = ElasticEPState(R, torch.device("cpu"))
        self.load = torch.randint(1, 100, (L, E), generator=g).double()
        self.committed = rebalance(self.load, R, S)
        self.weights = self.experts[torch.arange(L)[:, None], self.committed.phy2log]  # [L, P, D]
        self.turn = threading.Lock()
        self.served = self.bad = self.passes = 0
        self.stop = threading.Event()

    def p2l(self):
        return self.committed.to_sglang()[0]

    def apply_chunk(self, target: Placement, layers):
        with self.turn:
            live = torch.from_numpy(self.state.active_ranks_cpu.numpy().astype(bool)).repeat_interleave(S)
            for l in layers:
                src = self.committed.phy2log[l]
                new = self.weights[l].clone()
                for slot in range(R * S):
                    e = int(target.phy2log[l, slot])
                    if e < 0 or int(src[slot]) == e:
                        continue
                    holders = ((src == e) & live).nonzero().flatten()
                    assert len(holders), f"layer {l}: expert {e} has no live source"
                    new[slot] = self.weights[l, int(holders[0])]
                self.weights[l] = new
                phy = self.committed.phy2log.clone()
                phy[l] = target.phy2log[l]
                self.committed = Placement(phy, R, E)

    def serve(self):
        g = torch.Generator().manual_seed(1)
        while not self.stop.is_set():
            with self.turn:
                alive = self.state.active_ranks_cpu.numpy().astype(bool)
                for l in range(L):
                    e = torch.randint(0, E, (16,), generator=g)
                    for t in e.tolist():
                        slots = (self.committed.phy2log[l] == t).nonzero().flatten().tolist()
                        slots = [s for s in slots if alive[s // S]]
                        ok = bool(slots) and torch.equal(self.weights[l, slots[0]], self.experts[l, t])
                        self.served += 1
                        self.bad += not ok
                self.passes += 1


class LocalEngine:
    """The schedulers, here one in-process SchedulerDrain (SGLang: an RPC to every scheduler)."""

    def __init__(self, sim: SimCluster):
        self.sched = SchedulerDrain(sim.state, sim.p2l, sim.apply_chunk, E, get_load=lambda: sim.load)

    def view(self):
        return self.sched.view()

    def step(self, drain_id, ranks, step):
        return self.sched.step(drain_id, ranks, step)


def test_drain_moves_experts_while_serving_then_masks_no_token_lost():
    sim = SimCluster()
    ctl = DrainController(LocalEngine(sim), pause_s=0.002)
    server = threading.Thread(target=sim.serve)
    server.start()
    try:
        code, body = ctl.request({"ranks": [1]})
        assert code == 202 and body["ranks"] == [1] and body["message"] == "drain started"
        code2, body2 = ctl.request({"ranks": [1]})  # same drain again: idempotent
        assert code2 in (200, 202)
        code3, body3 = ctl.request({"ranks": [2]})
        if code3 != 200:  # still running: a second drain is refused
            assert code3 == 409 and "a drain of ranks [1] is running" in body3["error"]
        job = ctl.wait(60)
        passes_at_end = sim.passes
        while sim.passes < passes_at_end + 3:  # serve a few passes after the mask too
            threading.Event().wait(0.01)
    finally:
        sim.stop.set()
        server.join()
    assert job.phase == "done", job
    assert job.layers_done == job.layers_total > 0
    assert sim.state.live_ranks() == [0, 2, 3]
    assert (sim.committed.by_rank()[:, 1] == -1).all()
    assert sim.served > 0 and sim.bad == 0
    st = ctl.status()
    assert st["live_ranks"] == [0, 2, 3] and st["drained_ranks"] == [1] and st["drain"]["phase"] == "done"
    # again: nothing left to drain
    code, body = ctl.request({"ranks": [1]})
    assert code == 200 and "nothing to drain" in body["message"]


def test_drain_refusals_through_the_controller():
    sim = SimCluster()
    ctl = DrainController(LocalEngine(sim))
    assert ctl.request({"ranks": [7]}) == (400, {"error": "rank 7 is not an EP rank: ranks are 0..3"})
    code, body = ctl.request({"ranks": [0, 1, 2]})
    assert code == 422 and "fewer than the 12 logical experts" in body["error"]
    assert ctl.status()["drain"] is None


def test_scheduler_steps_are_idempotent_and_ordered():
    sim = SimCluster()
    sd = SchedulerDrain(sim.state, sim.p2l, sim.apply_chunk, E)
    p = sd.step("a", [2], 0)
    assert sd.step("a", [2], 0) is p
    with pytest.raises(DrainError, match="step 3 out of order"):
        sd.step("a", [2], 3)
    with pytest.raises(DrainError, match="drain a of ranks \\[2\\] is running") as e:
        sd.step("b", [1], 0)
    assert e.value.status == 409
    for k in range(1, sd.steps + 1):
        sd.step("a", [2], k)
        assert sd.step("a", [2], k).phase in ("moving", "done")  # a retried step changes nothing
    assert p.phase == "done" and sim.state.live_ranks() == [0, 1, 3]


def test_state_larger_than_the_placement():
    """SGLang's state may have room for --max-ep-size ranks; the drain works on the placement's ranks."""
    sim = SimCluster()
    big = ElasticEPState(6, torch.device("cpu"))
    sd = SchedulerDrain(big, sim.p2l, sim.apply_chunk, E, num_ranks=R)
    v = sd.view()
    assert (v.ep_size, v.live, v.slots_per_rank) == (R, (0, 1, 2, 3), S)
    with pytest.raises(DrainError, match=r"rank 5 is not an EP rank: ranks are 0..3"):
        sd.step("a", [5], 0)

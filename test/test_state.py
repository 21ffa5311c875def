"""sglang_elastic.state: the elastic-EP live-rank mask, epoch and listeners."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sglang_elastic.state import ElasticEPEvent, ElasticEPState, ElasticEPStateManager


@pytest.fixture(autouse=True)
def _fresh_singleton():
    ElasticEPStateManager.reset()
    yield
    ElasticEPStateManager.reset()


def test_instance_is_none_before_init_and_init_is_idempotent():
    assert ElasticEPStateManager.instance() is None
    st = ElasticEPStateManager.init(ep_size=4, device="cpu")
    assert ElasticEPStateManager.instance() is st
    assert ElasticEPStateManager.init(ep_size=8, device="cpu") is st  # later calls return it unchanged
    assert st.ep_size == 4 and st.live_ranks() == [0, 1, 2, 3] and st.epoch == 0
    assert st.active_ranks.dtype == torch.int32 and st.active_ranks.tolist() == [1, 1, 1, 1]


def test_healthy_rank_state_before_init():
    """Upstream's healthy_rank_state returned None / crashed when called before init."""
    assert ElasticEPStateManager.instance() is None
    t = ElasticEPStateManager.healthy_rank_state(ep_size=6, device="cpu")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.tolist() == [1] * 6
    t2 = ElasticEPStateManager.healthy_rank_state(3)  # positional, default device
    assert t2.tolist() == [1, 1, 1]
    # after init: defaults to the state's capacity, and is a fresh tensor (not the live mask)
    st = ElasticEPStateManager.init(ep_size=2, device="cpu", max_ep_size=5)
    st.mark_failed(1)
    t3 = ElasticEPStateManager.healthy_rank_state()
    assert t3.tolist() == [1] * 5 and t3.data_ptr() != st.active_ranks.data_ptr()


def test_healthy_rank_state_without_any_size_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="ep_size"):
        ElasticEPStateManager.healthy_rank_state()
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ElasticEPStateManager.healthy_rank_state(device="cpu").tolist() == [1, 1, 1]


def test_init_from_server_args_like_upstream():
    off = SimpleNamespace(elastic_ep_backend=None, tp_size=4)
    assert ElasticEPStateManager.init(off) is None and ElasticEPStateManager.instance() is None
    args = SimpleNamespace(elastic_ep_backend="nixl", tp_size=4, pp_size=1, max_ep_size=6, device="cpu")
    st = ElasticEPStateManager.init(args)
    assert st is ElasticEPStateManager.instance()
    assert st.active_ranks.tolist() == [1, 1, 1, 1, 0, 0]  # reserved slots inactive until they join
    assert st.effective_ep_size == 4 and ElasticEPStateManager.get_effective_ep_size() == 4
    assert not ElasticEPStateManager.is_scaling()
    assert torch.equal(st.last_active_ranks, st.active_ranks)


def test_in_place_updates_visible_through_earlier_reference():
    st = ElasticEPStateManager.init(ep_size=4, device="cpu")
    held = ElasticEPStateManager.instance().active_ranks  # what a kernel would keep
    ptr, cpu_ptr = held.data_ptr(), st.active_ranks_cpu.data_ptr()
    view = held[1:3]  # a view taken earlier also sees the writes
    st.mark_failed([2], "PeerFailure")
    assert held.tolist() == [1, 1, 0, 1] and view.tolist() == [1, 0]
    ElasticEPStateManager.mark_joined(2)
    ElasticEPStateManager.mark_failed(0, "x")
    assert held.tolist() == [0, 1, 1, 1]
    st.apply_membership([3], epoch=10)
    st.reset()  # upstream reset: [0, effective) alive
    st.apply_membership([0, 1], epoch=11)
    assert held.tolist() == [1, 1, 0, 0]
    assert st.active_ranks is held and st.active_ranks.data_ptr() == ptr
    assert st.active_ranks_cpu.data_ptr() == cpu_ptr and st.active_ranks_cpu.tolist() == [1, 1, 0, 0]


def test_snapshot_and_equal_last():
    st = ElasticEPStateManager.init(ep_size=3, device="cpu")
    last = st.last_active_ranks
    assert st.is_active_equal_last()
    st.mark_failed(1)
    assert not st.is_active_equal_last()
    st.snapshot_active_to_last()
    assert st.is_active_equal_last() and st.last_active_ranks is last and last.tolist() == [1, 0, 1]


def test_kernel_written_mask_is_adopted_by_sync_active_to_cpu():
    """NIXL-EP's dispatcher writes active_ranks itself; sync_active_to_cpu turns that into an event."""
    st = ElasticEPState(4, "cpu")
    events = []
    st.add_listener(events.append)
    st.active_ranks[3] = 0  # a kernel masks rank 3
    assert st.live_ranks() == [0, 1, 2, 3] and st.epoch == 0  # nothing known yet (no device read)
    st.sync_active_to_cpu()
    assert st.live_ranks() == [0, 1, 2] and st.epoch == 1 and st.active_ranks_cpu.tolist() == [1, 1, 1, 0]
    assert events == [ElasticEPEvent("failed", (3,), 1, "device mask")]
    st.sync_active_to_cpu()
    assert st.epoch == 1


def test_epoch_listeners_idempotence():
    st = ElasticEPState(6, "cpu")
    events: list = []
    st.add_listener(events.append)
    e0 = st.epoch
    assert not st.changed_since(e0)
    assert st.mark_failed([1, 4], "transport PeerFailure") == 1
    assert st.changed_since(e0) and not st.changed_since(1)
    assert events == [ElasticEPEvent("failed", (1, 4), 1, "transport PeerFailure")]
    # already dead: no bump, no event
    assert st.mark_failed(1, "again") == 1 and st.mark_failed([4, 1]) == 1 and len(events) == 1
    assert st.mark_joined([0, 1]) == 2  # 0 already alive: only 1 joins
    assert events[-1] == ElasticEPEvent("joined", (1,), 2, "")
    assert st.mark_joined(1) == 2 and len(events) == 2
    assert st.mark_failed([]) == 2  # nothing: no bump
    # every rank failed is allowed
    assert st.mark_failed(range(6), "all gone") == 3
    assert st.live_ranks() == [] and st.dead_ranks() == list(range(6))
    assert st.active_ranks.tolist() == [0] * 6
    assert events[-1].ranks == (0, 1, 2, 3, 5)


def test_listener_exceptions_are_logged_and_do_not_break_state(caplog):
    st = ElasticEPState(3, "cpu")
    seen = []

    def bad(ev):
        raise RuntimeError("listener bug")

    st.add_listener(bad)
    st.add_listener(seen.append)
    with caplog.at_level("ERROR"):
        assert st.mark_failed(2, "x") == 1
    assert "listener bug" in caplog.text
    assert seen and seen[0].ranks == (2,) and st.live_ranks() == [0, 1]
    st.remove_listener(bad)
    st.mark_joined(2)
    assert len(seen) == 2
    with pytest.raises(TypeError):
        st.add_listener(42)


def test_listener_may_change_state_events_stay_in_epoch_order():
    st = ElasticEPState(4, "cpu")
    seen = []

    def cascade(ev):
        seen.append((ev.kind, ev.ranks, ev.epoch))
        if ev.kind == "failed" and ev.ranks == (0,):
            st.mark_failed(1, "cascade")  # re-entrant change from a listener

    st.add_listener(cascade)
    st.mark_failed(0, "first")
    assert seen == [("failed", (0,), 1), ("failed", (1,), 2)]


def test_apply_membership_sets_live_set_and_agreed_epoch():
    st = ElasticEPState(8, "cpu", live=range(4))
    events = []
    st.add_listener(events.append)
    assert st.apply_membership([0, 1, 3], epoch=5) == 5
    assert st.live_ranks() == [0, 1, 3] and st.epoch == 5 and st.membership_epoch == 5
    assert events[-1].kind == "failed" and events[-1].ranks == (2,) and events[-1].membership_epoch == 5
    # a stale (older) view is ignored
    assert st.apply_membership([0], epoch=4) == 5 and st.live_ranks() == [0, 1, 3]
    # a restarted rank (new incarnation, alive before and after): failed then joined, one epoch
    n = len(events)
    assert st.apply_membership([0, 1, 3, 6], epoch=6, restarted=[1]) == 6
    assert [(e.kind, e.ranks, e.epoch) for e in events[n:]] == [("failed", (1,), 6), ("joined", (1, 6), 6)]
    assert st.effective_ep_size == 7  # a rank beyond the launch size joined
    # no change, newer epoch: the epoch follows the agreed one silently
    assert st.apply_membership([0, 1, 3, 6], epoch=9) == 9 and len(events) == n + 2
    # local marks may run ahead of the agreed epoch; the next change still bumps
    st.mark_failed(0, "local PeerFailure")
    assert st.epoch == 10
    assert st.apply_membership([1, 3, 6], epoch=10) == 10  # agreement on the same death: no new change
    assert st.apply_membership([3, 6], epoch=11) == 11


def test_bad_rank_ids_raise_clear_errors_and_change_nothing():
    st = ElasticEPState(4, "cpu")
    for bad in (4, -1, [0, 7], [True], "1", 1.5, [None]):
        with pytest.raises(ValueError, match="rank"):
            st.mark_failed(bad, "x")
    with pytest.raises(ValueError, match=r"0\.\.3"):
        st.mark_joined(9)
    with pytest.raises(ValueError):
        st.apply_membership([0, 4], epoch=1)
    assert st.live_ranks() == [0, 1, 2, 3] and st.epoch == 0
    assert st.mark_failed(torch.tensor([3]), "tensor ids are fine") == 1
    with pytest.raises(ValueError):
        ElasticEPState(0, "cpu")
    with pytest.raises(RuntimeError, match="init"):
        ElasticEPStateManager.mark_failed(0)
    with pytest.raises(ValueError, match="max_ep_size"):
        ElasticEPStateManager.init(ep_size=4, max_ep_size=2, device="cpu")


def test_thread_safety_smoke():
    n_ranks, n_threads, rounds = 64, 16, 200
    st = ElasticEPState(n_ranks, "cpu")
    events = []
    lock = threading.Lock()

    def on(ev):
        with lock:
            events.append(ev)

    st.add_listener(on)
    barrier = threading.Barrier(n_threads)

    def worker(t):
        barrier.wait()
        for i in range(rounds):
            r = (t * 7 + i) % n_ranks
            if (i + t) % 3:
                st.mark_failed([r, (r + 1) % n_ranks], f"t{t}")
            else:
                st.mark_joined(r)
            st.live_ranks()
            st.changed_since(i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # the three views of the mask agree, and the event log replays to the same mask
    live = st.live_ranks()
    assert st.active_ranks.tolist() == st.active_ranks_cpu.tolist() == [1 if r in live else 0 for r in range(n_ranks)]
    replay = [1] * n_ranks
    epochs = [ev.epoch for ev in events]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs) == st.epoch
    for ev in events:
        for r in ev.ranks:
            assert replay[r] == (1 if ev.kind == "failed" else 0)  # each event is a real change
            replay[r] = 0 if ev.kind == "failed" else 1
    assert replay == st.active_ranks.tolist()


def test_manager_delegates_and_scale_phases():
    assert ElasticEPStateManager.epoch() == 0 and ElasticEPStateManager.get_scale_phase() == "disabled"
    st = ElasticEPStateManager.init(ep_size=2, max_ep_size=4, device="cpu")
    seen = []
    ElasticEPStateManager.add_listener(seen.append)
    ElasticEPStateManager.mark_failed(1, "x")
    assert ElasticEPStateManager.is_scaling()  # a rank below effective_ep_size is dead
    assert ElasticEPStateManager.changed_since(0) and ElasticEPStateManager.epoch() == 1
    assert ElasticEPStateManager.live_ranks() == [0] and seen[0].ranks == (1,)
    assert ElasticEPStateManager.request_scale(4) and ElasticEPStateManager.begin_scale()
    ElasticEPStateManager.mark_configuring_data_plane()
    assert ElasticEPStateManager.get_data_plane_ep_size() == 4
    ElasticEPStateManager.commit_scale()
    assert st.live_ranks() == [0, 1, 2, 3] and st.scale_phase == "serving_expanded"
    assert not ElasticEPStateManager.is_scaling()
    with pytest.raises(ValueError, match="capacity"):
        ElasticEPStateManager.request_scale(5)

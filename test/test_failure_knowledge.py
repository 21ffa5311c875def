"""Every wait of a transport and a host dispatcher ends when the peer it waits for is SIGKILLed,
with its own timeout at an hour: only knowledge of the death can end it (issue 19).

Real processes on 127.0.0.1 for each backend (see ``_detect_harness.py``): a blocked weight transfer
raises ``PeerFailure`` naming the killed rank on every survivor; a blocked combine gives up on the
killed rank (marks it failed, renormalises its pairs) and returns.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import _detect_harness as h
from sglang_elastic.transport import Liveness, PeerFailure, PeerWatch, store_wait

KINDS = ("torch", "nixl", "mooncake")


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    yield
    h.stop_forkserver()


def _require(kind: str) -> None:
    mod = {"torch": "torch.distributed", "nixl": "nixl._api", "mooncake": "mooncake.engine"}[kind]
    try:
        __import__(mod)
    except Exception as exc:  # noqa: BLE001 - any import failure means the library is not installed
        pytest.fail(f"library for {kind!r} is missing ({exc}); run bash .ci/setup --test")


@pytest.mark.parametrize("kind", KINDS)
def test_killed_peer_ends_blocked_transfer_and_combine(kind):
    _require(kind)
    res = h.run(kind, FEED)
    transfer, combine = res["transfer"], res["combine"]
    assert sorted(transfer) == [r for r in range(h.R) if r != h.VT]
    for rank, (status, payload, _) in transfer.items():
        assert status == "peerfailure", (kind, rank, status, payload)
        assert payload["rank"] == h.VT, (kind, rank, payload)
    assert sorted(combine) == [r for r in range(h.R) if r not in (h.VT, h.VC)]
    for rank, (status, payload, _) in combine.items():
        assert status == "returned", (kind, rank, status, payload)
        assert payload["live"] == [r for r in range(h.R) if r not in (h.VT, h.VC)], (kind, rank, payload)
        assert payload["failures"] == 1, (kind, rank, payload)


FEED = "membership"  # the real membership watch feeds each rank's Liveness


def test_store_wait_ends_when_its_writer_is_known_dead():
    """A wait for a key that rank 3 was to write (deadline in an hour) ends with PeerFailure(3) once
    the process learns rank 3 died; a key that exists is returned at once; no writer, no knowledge."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    lv = Liveness()
    store.set("here", "1")
    assert store_wait(store, "here", time.monotonic() + 3600, liveness=lv, ranks=(3,))
    assert not store_wait(store, "never", time.monotonic() + 0.05, liveness=lv, ranks=(3,))
    threading.Timer(0.2, lv.mark_dead, args=(3, "killed")).start()
    with pytest.raises(PeerFailure, match="rank 3") as ei:
        store_wait(store, "never", time.monotonic() + 3600, liveness=lv, ranks=(1, 3), what="a test wait")
    assert ei.value.rank == 3 and "a test wait" in str(ei.value)


def test_peer_watch_records_deaths_and_withdraws_only_its_own():
    """A failed probe is recorded as a death; a newer incarnation connecting withdraws it; a death
    somebody else recorded (membership) stays until they clear it."""
    lv = Liveness()
    gone = {2}
    w = PeerWatch(lv, lambda r, since: r not in gone, probe_every_s=0.0, owner="test endpoint")
    wait = w.wait("test")
    assert [r for r, _ in wait.failed([1, 2])] == [2] and lv.is_dead(2) and "test endpoint" in lv.reason(2)
    with pytest.raises(PeerFailure) as ei:
        wait.check([1, 2])
    assert ei.value.rank == 2
    w.connected(2, 5)
    assert not lv.is_dead(2)
    lv.mark_dead(1, "membership epoch 3: heartbeat connection closed")
    w.connected(1, 7)
    assert lv.is_dead(1)

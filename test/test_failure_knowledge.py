"""Every wait of a transport and a host dispatcher ends when the peer it waits for is SIGKILLed,
with its own timeout at an hour: only knowledge of the death can end it (issue 19).

Real processes on 127.0.0.1 for each backend (see ``_detect_harness.py``): a blocked weight transfer
raises ``PeerFailure`` naming the killed rank on every survivor; a blocked combine gives up on the
killed rank (marks it failed, renormalises its pairs) and returns.
"""
from __future__ import annotations

import pytest

import _detect_harness as h

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

"""Liveness: the process-local record of dead peers that every wait consults."""
import threading
import time

import pytest

from sglang_elastic.transport import Liveness, PeerFailure


def test_check_names_the_dead_rank_and_only_when_waited_for():
    lv = Liveness()
    lv.check([1, 2, 3])  # nothing known: returns
    assert lv.mark_dead(2, "EOF on its membership connection", incarnation=0)
    assert not lv.mark_dead(2, "again")  # not news
    lv.check([1, 3])
    with pytest.raises(PeerFailure) as ei:
        lv.check([1, 2, 3], what="combine")
    assert ei.value.rank == 2 and ei.value.ranks == [2]
    assert "rank 2" in str(ei.value) and "combine" in str(ei.value) and "EOF" in str(ei.value)
    assert lv.first_dead([0, 2]) == 2 and lv.is_dead(2) and lv.dead() == frozenset({2})


def test_rejoin_clears_only_an_older_incarnation():
    lv = Liveness()
    lv.mark_dead(4, "killed", incarnation=3)
    lv.mark_alive(4, incarnation=2)  # a stale "alive" for an older process: the death stands
    assert lv.is_dead(4)
    lv.mark_alive(4, incarnation=4)
    assert not lv.is_dead(4) and lv.reason(4) is None


def test_wait_wakes_on_news_and_listeners_hear_it():
    lv = Liveness()
    heard = []
    lv.add_listener(lambda r, why: heard.append((r, why)))
    v = lv.version
    t = threading.Timer(0.05, lambda: lv.mark_dead(7, "gone"))
    t.start()
    # The timeout is far beyond the test's limit: only the news can end this wait.
    assert lv.wait(3600.0, since_version=v)
    assert heard == [(7, "gone")]
    assert not lv.wait(0.01)

"""The background updater's threads: lower CPU priority than serving, and its setting's checks."""
import os
import threading

import pytest
import torch

from sglang_elastic.location.threads import BACKGROUND_NICE, SharedThreads, lower_priority


def _nice_of_thread(fn) -> int:
    got = []

    def run():
        fn()
        got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return got[0]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux-only")
def test_updater_threads_run_below_serving_and_leave_the_caller_alone():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _nice_of_thread(lambda: lower_priority(BACKGROUND_NICE)) == min(base + BACKGROUND_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base, "only the calling thread"
    assert _nice_of_thread(lambda: lower_priority(0)) == base

    # The shared threads lower themselves when they start.
    th = SharedThreads(torch.distributed.HashStore(), "t", nice=5)
    seen = []
    th.submit(type("Owner", (), {"_run_job": lambda self, fn, job: fn()})(),
              lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), None)
    th.join()
    th.close()
    assert seen == [min(base + 5, 19)]


def test_bad_nice_setting_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("SGLANG_ELASTIC_UPDATER_NICE", "high")
    with pytest.raises(ValueError, match=r"^SGLANG_ELASTIC_UPDATER_NICE must be an integer >= 0, got 'high'$"):
        SharedThreads(torch.distributed.HashStore(), "t")
    monkeypatch.setenv("SGLANG_ELASTIC_UPDATER_NICE", "3")
    assert SharedThreads(torch.distributed.HashStore(), "t").nice == 3

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


_EXIT_CHECK = r'''
import datetime, sys, threading, time, types
import torch
from sglang_elastic.location.background import BackgroundUpdater
from sglang_elastic.location.threads import SharedThreads
from sglang_elastic.transport import Liveness

store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=30))
threads = SharedThreads(store, "exit-check", nice=0)


class Reader:
    """A poll that never completes, inside a store call nearly all the time (a worst case of the
    poller's read), ending only as SharedThreads' poll loops must: when it stops."""
    def _poll_job(self, job):
        while not threads.stopping.is_set():
            threads.bg_store.check(["never"])


# The updater's own poll loop, on a job whose marks never come (a peer that exited first).
me = types.SimpleNamespace(_closing=False, _uid=0, liveness=Liveness(), _threads=threads, _bg_store=threads.bg_store,
                           rank=0)
me._poll_job = types.MethodType(BackgroundUpdater._poll_job, me)
threads.poll(me, types.SimpleNamespace(final=None, uid=0, live=[1], keys=["never"]))
threads.poll(Reader(), None)


class Owner:
    def _run_job(self, fn, job):
        fn()


def reads():  # a job polling the store (as a transfer's wait does) for a minute
    end = time.monotonic() + 60
    while time.monotonic() < end:
        threads.bg_store.check(["never"])


# A job running when the program ends, and one queued behind it that polls the store: the queued one
# is dropped at exit (run, it would still be inside a store call when the interpreter finalizes).
threads.submit(Owner(), lambda: time.sleep(1.0), None)
threads.submit(Owner(), reads, None)
time.sleep(0.3)
print("main ends", flush=True)
'''


def test_a_process_ends_cleanly_while_its_poller_waits_on_the_store(tmp_path):
    """The updater's threads are daemons; one inside a store call when the interpreter finalizes was
    ended by a forced unwind through C++ that forbids it, and the process aborted after the program
    ended ("terminate called without an active exception", exit -6, seen at the end of multi-process
    checks). The exit hook stops the threads first (jobs still queued dropped), so the process exits 0."""
    import subprocess
    import sys

    script = tmp_path / "exit_check.py"
    script.write_text(_EXIT_CHECK)
    for _ in range(2):
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "main ends" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])
        assert "terminate called" not in p.stderr

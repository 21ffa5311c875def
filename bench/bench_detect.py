"""Time from a peer's SIGKILL to the end of a blocked wait on it, per transport: with the membership
watch feeding each rank's Liveness vs the transport's own detection only, in the same run.

Four CPU ranks on 127.0.0.1 (``test/_detect_harness.py``), every wait's own timeout at an hour:

* transfer: ranks 0-2 block in ``Transport.execute`` reading rows of rank 3, which idles; rank 3 is
  SIGKILLed; the time until each survivor raises ``PeerFailure(3)``;
* combine: ranks 0-2 dispatch, rank 2 idles, ranks 0-1 block in ``combine``; rank 2 is SIGKILLed;
  the time until each survivor's ``combine`` returns having given up on rank 2.

Feeds: ``membership`` (a ``MembershipClient(..., liveness=lv)`` per rank; the membership server sees
the killed process's watch connection close), ``none`` (no feed: NIXL disconnect errors and
probes, Mooncake failed transfers and probes, gloo connection errors).

    .venv/bin/python bench/bench_detect.py [--kinds torch,nixl,mooncake] [--feeds membership,none] [--repeat 3]

Prints the median and max over repeats and survivors, in milliseconds, and when each survivor's
Liveness learned of the death (from the membership watch, or from the rank's own transport or
dispatcher, whichever came first; "-" when only a peer's FAIL notice ended the wait).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

TEST = Path(__file__).resolve().parent.parent / "test"
sys.path.insert(0, str(TEST))
os.environ["PYTHONPATH"] = os.pathsep.join([str(TEST), os.environ.get("PYTHONPATH", "")])

import _detect_harness as h  # noqa: E402

KINDS = ("torch", "nixl", "mooncake")


def _csv(text: str, allowed, what: str):
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"bench_detect: unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--feeds", default="membership,none")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    kinds = _csv(a.kinds, KINDS, "transport")
    feeds = _csv(a.feeds, h.FEEDS, "feed")
    if not 1 <= a.repeat <= 100:
        raise SystemExit(f"bench_detect: --repeat must be in [1, 100], got {a.repeat}")
    rows = []
    try:
        for kind in kinds:
            for feed in feeds:
                times = {"transfer": [], "combine": []}
                known = {"transfer": [], "combine": []}  # kill -> the rank's Liveness knew (any source)
                for _ in range(a.repeat):
                    res = h.run(kind, feed)
                    for phase, got in res.items():
                        for status, payload, dt in got.values():
                            ok = (status == "peerfailure" and payload["rank"] == h.VT) if phase == "transfer" else \
                                (status == "returned" and payload["failures"] == 1)
                            if not ok:
                                raise SystemExit(f"bench_detect: {kind}/{feed} {phase}: unexpected {status} {payload}")
                            times[phase].append(dt * 1e3)
                            if payload.get("known"):
                                known[phase].append(payload["known"][0] * 1e3)
                rows.append((kind, feed, times, known))
                print(f"# {kind:9s} {feed:10s} transfer {statistics.median(times['transfer']):7.1f} ms  "
                      f"combine {statistics.median(times['combine']):7.1f} ms", file=sys.stderr, flush=True)
    finally:
        h.stop_forkserver()
    print(f"SIGKILL -> end of a blocked wait (ms; median / max over {a.repeat} runs x survivors; "
          "own timeouts 3600 s)\n")
    print("| transport | feed | blocked transfer: median | max | Liveness knew (median) | blocked combine: median "
          "| max | Liveness knew (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def med(xs) -> str:
        return f"{statistics.median(xs):.1f}" if xs else "-"

    for kind, feed, t, k in rows:
        label = "membership watch" if feed == "membership" else ("by hand" if feed == "hand" else "own detection only")
        print(f"| {kind} | {label} | {med(t['transfer'])} | {max(t['transfer']):.1f} | {med(k['transfer'])} | "
              f"{med(t['combine'])} | {max(t['combine']):.1f} | {med(k['combine'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

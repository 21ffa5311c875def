"""SGLang-side checks of the operator surface, run with ``.venv-sglang/bin/python`` by
test/test_sglang_operator.py (real SGLang 0.5.23 code on CPU):

    python test/_sglang_operator_checks.py drain WORKDIR     # drain routes on SGLang's FastAPI app, RPC path
    python test/_sglang_operator_checks.py metrics WORKDIR   # our series in SGLang's multiprocess /metrics

Each prints ``CHECK <name> ok`` lines and exits 0, or raises (non-zero exit, traceback on stderr).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import types
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

L, E, R, S = 4, 8, 4, 3


def ok(name: str) -> None:
    print(f"CHECK {name} ok", flush=True)


# ----------------------------------------------------------------------------- drain
def _scheduler_loop(rpc_ipc_name: str, stub, stop: threading.Event) -> None:
    """A scheduler's RPC handling as SGLang does it: recv on a DEALER connected to the RPC channel,
    ``Scheduler.handle_rpc_request`` (SGLang's own; the TP barrier is a no-op with one scheduler)."""
    import zmq
    from sglang.srt.managers import scheduler as sched_mod
    from sglang.srt.managers.io_struct import sock_recv, sock_send
    from sglang.srt.utils.network import get_zmq_socket

    sched_mod.barrier = lambda group=None: None  # one scheduler process here, no torch.distributed group
    sock = get_zmq_socket(zmq.Context.instance(), zmq.DEALER, rpc_ipc_name, False)
    while not stop.is_set():
        if sock.poll(50):
            req = sock_recv(sock)
            sock_send(sock, sched_mod.Scheduler.handle_rpc_request(stub, req))
    sock.close(0)


def check_drain(workdir: str) -> None:
    from starlette.testclient import TestClient

    from sglang.srt.entrypoints.http_server import app  # SGLang's real FastAPI app

    from sglang_elastic.eplb.algorithms import rebalance
    from sglang_elastic.eplb.placement import Placement
    from sglang_elastic.sglang_plugin import context
    from sglang_elastic.sglang_plugin.drain import DrainController, SchedulerDrain
    from sglang_elastic.sglang_plugin.drain_sglang import (RPC_METHOD, RpcEngine, after_scheduler_init,
                                                           install_routes, publish_cluster_view)
    from sglang_elastic.state import ElasticEPStateManager

    os.environ["SGLANG_ELASTIC_RUN_DIR"] = workdir
    ctx = context.reset()
    state = ElasticEPStateManager.init(ep_size=R, device="cpu")
    load = torch.arange(1, L * E + 1, dtype=torch.float64).reshape(L, E)
    committed = {"p": rebalance(load, R, S)}
    moved, gate = [], threading.Event()

    def apply_chunk(target: Placement, layers):  # the GPU part: SGLang's update entry point on the model
        gate.wait(60)
        phy = committed["p"].phy2log.clone()
        phy[layers] = target.phy2log[layers]
        committed["p"] = Placement(phy, R, E)
        moved.extend(layers)

    sd = SchedulerDrain(state, lambda: committed["p"].to_sglang()[0], apply_chunk, E, get_load=lambda: load,
                        on_progress=lambda p: None)
    from sglang_elastic.sglang_plugin import drain_sglang

    def on_progress(p):
        drain_sglang.write_status(workdir, drain_sglang.DRAIN_FILE, p.as_dict())
        publish_cluster_view(sd.view())

    sd.on_progress = on_progress
    ctx.scheduler_drain = sd
    stub = types.SimpleNamespace(tp_group=types.SimpleNamespace(cpu_group=None))
    after_scheduler_init(None, stub)  # the hook SGLang runs after Scheduler.__init__
    assert callable(getattr(stub, RPC_METHOD))
    publish_cluster_view(sd.view())

    rpc = f"ipc://{workdir}/rpc"
    stop = threading.Event()
    loop = threading.Thread(target=_scheduler_loop, args=(rpc, stub, stop), daemon=True)
    loop.start()
    ctl = DrainController(RpcEngine(rpc, workdir, timeout_s=60))
    install_routes(app, ctl)
    install_routes(app, ctl)  # idempotent
    assert sum(getattr(r, "path", "") == "/elastic_ep/drain" for r in app.router.routes) == 1
    client = TestClient(app)
    try:
        st = client.get("/elastic_ep/status")
        assert st.status_code == 200 and st.json()["live_ranks"] == [0, 1, 2, 3] and st.json()["drain"] is None, st.text
        for body, code, text in ((b"{nope", 400, "the body is not JSON"), (b"[1]", 400, "must be a JSON object"),
                                 (b'{"ranks": [9]}', 400, "rank 9 is not an EP rank: ranks are 0..3"),
                                 (b'{"ranks": ["x"]}', 400, "must hold integers"),
                                 (b'{"ranks": [0, 1, 2]}', 422, "fewer than the 8 logical experts")):
            r = client.post("/elastic_ep/drain", content=body, headers={"content-type": "application/json"})
            assert r.status_code == code and text in r.json().get("error", ""), (body, r.status_code, r.text)
        r = client.post("/elastic_ep/drain", json={"ranks": [1]})
        assert r.status_code == 202 and r.json()["ranks"] == [1], r.text
        r2 = client.post("/elastic_ep/drain", json={"ranks": [1]})
        assert r2.status_code == 202 and r2.json()["message"] == "this drain is running", r2.text
        r3 = client.post("/elastic_ep/drain", json={"ranks": [2]})
        assert r3.status_code == 409 and "a drain of ranks [1] is running" in r3.json()["error"], r3.text
        gate.set()
        job = ctl.wait(60)
        assert job.phase == "done", job
        st = client.get("/elastic_ep/status").json()
        assert st["live_ranks"] == [0, 2, 3] and st["drained_ranks"] == [1], st
        assert st["drain"]["layers_done"] == st["drain"]["layers_total"] == len(moved) > 0, st
        assert (committed["p"].by_rank()[:, 1] == -1).all()
        assert state.live_ranks() == [0, 2, 3]
        r = client.post("/elastic_ep/drain", json={"ranks": [1]})
        assert r.status_code == 200 and "nothing to drain" in r.json()["message"], r.text
    finally:
        stop.set()
        loop.join(5)
    ok("drain (SGLang FastAPI app, SGLang RPC dispatch, our state)")


# ----------------------------------------------------------------------------- metrics
def _scheduler_like(queue) -> None:
    """A spawned process like SGLang's schedulers: our state listener, EPLB drop-in and updater
    record into the plugin's metrics (multiprocess mode: PROMETHEUS_MULTIPROC_DIR is inherited)."""
    from sglang_elastic.sglang_plugin import context, eplb, state as plugin_state, updater
    from sglang_elastic.state import ElasticEPStateManager

    st = ElasticEPStateManager.init(ep_size=R, device="cpu")
    st.add_listener(plugin_state._on_event)
    plugin_state._on_event(None)
    st.mark_failed([2], reason="updater PeerFailure")
    w = torch.arange(1, L * E + 1, dtype=torch.float32).reshape(L, E)
    eplb.rebalance_experts(w, R * S, 1, 1, R, False, st.active_ranks_cpu)
    summary = updater.UpdateSummary(layers=[0], bytes_moved=4096, restored=2, seconds=0.01)
    updater._record(context.get(), summary, reporter=True)
    queue.put(os.getpid())


def check_metrics(workdir: str) -> None:
    from fastapi import FastAPI
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    from sglang.srt.utils.common import add_prometheus_middleware, set_prometheus_multiproc_dir

    from sglang_elastic.metrics import SERIES

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = workdir
    set_prometheus_multiproc_dir()  # what SGLang's launcher does with --enable-metrics
    ctx = mp.get_context("spawn")  # SGLang starts its schedulers with spawn
    q = ctx.Queue()
    p = ctx.Process(target=_scheduler_like, args=(q,))
    p.start()
    q.get(timeout=240)
    p.join(60)
    assert p.exitcode == 0, p.exitcode
    app = FastAPI()
    add_prometheus_middleware(app)  # SGLang's own /metrics mount
    text = TestClient(app).get("/metrics").text
    got = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    names = {n for n, _ in got}
    missing = [n for n in SERIES if not any(x == n or x.startswith(n + "_") for x in names)]
    assert not missing, (missing, text[-3000:])
    assert got[("sglang_elastic_live_ranks", ())] == 3
    assert got[("sglang_elastic_epoch", ())] == 1
    assert got[("sglang_elastic_rank_failures_total", (("reason", "peer_failure"),))] == 1
    assert got[("sglang_elastic_failover_seconds_count", ())] == 1
    assert got[("sglang_elastic_expert_bytes_moved_total", ())] == 4096
    assert got[("sglang_elastic_orphans_restored_total", ())] == 2
    assert got[("sglang_elastic_rebalance_pause_seconds_count", ())] == 1
    assert 0 < got[("sglang_elastic_balancedness", ())] <= 1
    ok("metrics (SGLang multiprocess /metrics)")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "drain":
        check_drain(sys.argv[2])
    elif what == "metrics":
        check_metrics(sys.argv[2])
    else:
        raise SystemExit(f"unknown check {what!r}")

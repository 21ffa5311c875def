"""Drain in SGLang: HTTP routes on SGLang's FastAPI app, steps as RPCs to every scheduler.

* **Routes** (``POST /elastic_ep/drain``, ``GET /elastic_ep/status``) are added to
  ``sglang.srt.entrypoints.http_server.app`` by a BEFORE hook on ``_setup_and_run_http_server``
  (the HTTP process, after the schedulers started). They drive a
  :class:`~sglang_elastic.sglang_plugin.drain.DrainController`.
* **Steps** travel as SGLang's own ``RpcReqInput(method="sglang_elastic_drain_step", ...)`` on its
  RPC channel (``port_args.rpc_ipc_name``; in HTTP-server mode nobody else binds it, the offline
  ``Engine`` does). The scheduler receiving it broadcasts it to its TP group and every scheduler
  runs ``Scheduler.handle_rpc_request`` in the same loop iteration, between forward passes: one
  collective step per RPC, serving in between. An AFTER hook on ``Scheduler.__init__`` adds the
  method to each scheduler.
* **Progress and the cluster view** go back through two small JSON files in the run folder
  (``SGLANG_ELASTIC_RUN_DIR``, made by the launcher and inherited by every process), written
  atomically by EP rank 0: an RPC answer carries only success and an error message.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import context
from .drain import ClusterView, DrainController, DrainError, DrainProgress, SchedulerDrain

__all__ = ["install_routes", "before_http_server", "after_scheduler_init", "RpcEngine", "RPC_METHOD",
           "write_status", "read_status", "cluster_view", "publish_cluster_view", "drain_step"]

log = logging.getLogger(__name__)

RPC_METHOD = "sglang_elastic_drain_step"
STATE_FILE, DRAIN_FILE = "state.json", "drain.json"


# ----------------------------------------------------------------------------- status files
def write_status(run_dir: str, name: str, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``run_dir/name`` atomically (temp file + rename)."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_status(run_dir: str, name: str) -> Optional[Dict[str, Any]]:
    """``run_dir/name`` as a dict, or None when not written yet."""
    try:
        return json.loads((Path(run_dir) / name).read_text())
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- HTTP side
def install_routes(app: Any, controller: DrainController) -> None:
    """Add ``POST /elastic_ep/drain`` and ``GET /elastic_ep/status`` to the FastAPI ``app`` (once)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if any(getattr(r, "path", None) == "/elastic_ep/drain" for r in app.router.routes):
        return

    async def drain(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError as exc:  # json.JSONDecodeError / UnicodeDecodeError
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        code, payload = await run_in_threadpool(controller.request, body)
        return JSONResponse(payload, status_code=code)

    async def status() -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(controller.status))
        except DrainError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    # FastAPI reads the parameter types from the annotations, which are strings in this module
    # (postponed evaluation) naming a local import: give it the objects.
    drain.__annotations__ = {"request": Request, "return": JSONResponse}
    status.__annotations__ = {"return": JSONResponse}
    app.add_api_route("/elastic_ep/drain", drain, methods=["POST"])
    app.add_api_route("/elastic_ep/status", status, methods=["GET"])


class RpcEngine:
    """The schedulers seen from the HTTP process: steps as SGLang RPCs, progress from the run folder.

    Args:
        rpc_ipc_name: SGLang's ``port_args.rpc_ipc_name`` (bound here on first use).
        run_dir: the run folder the schedulers write to.
        timeout_s: how long one step may take before the drain is reported failed.
    """

    def __init__(self, rpc_ipc_name: str, run_dir: str, timeout_s: float = 600.0) -> None:
        self.rpc_ipc_name, self.run_dir, self.timeout_s = rpc_ipc_name, run_dir, timeout_s
        self._sock = None
        self._lock = threading.Lock()

    def view(self) -> ClusterView:
        st = read_status(self.run_dir, STATE_FILE)
        if st is None:
            raise DrainError(503, "the schedulers have not published the elastic EP state (is --elastic-ep-backend "
                                  "set, and has the server finished starting?)")
        return ClusterView(st["ep_size"], tuple(st["live"]), st["slots_per_rank"], st["num_logical"], st["epoch"])

    def step(self, drain_id: str, ranks: List[int], step: int) -> DrainProgress:
        import zmq
        from sglang.srt.managers.io_struct import RpcReqInput, RpcReqOutput, sock_recv, sock_send

        with self._lock:
            if self._sock is None:
                from sglang.srt.utils.network import get_zmq_socket

                self._sock = get_zmq_socket(zmq.Context.instance(), zmq.DEALER, self.rpc_ipc_name, True)
            sock_send(self._sock, RpcReqInput(method=RPC_METHOD, parameters=dict(
                drain_id=drain_id, ranks=",".join(map(str, ranks)), step=step)))
            if not self._sock.poll(int(self.timeout_s * 1000)):
                raise TimeoutError(f"no answer from the schedulers to drain step {step} within {self.timeout_s:.0f} s")
            out = sock_recv(self._sock)
        if not isinstance(out, RpcReqOutput):
            raise RuntimeError(f"unexpected answer {type(out).__name__} on SGLang's RPC channel")
        if not out.success:
            raise RuntimeError(out.message or "drain step failed on a scheduler")
        p = read_status(self.run_dir, DRAIN_FILE)
        if p is None or p.get("drain_id") != drain_id:
            raise RuntimeError("the schedulers did not report the drain's progress")
        return DrainProgress(**p)


def before_http_server(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``http_server._setup_and_run_http_server(server_args, tokenizer_manager,
    template_manager, port_args, ...)``: mount the drain routes on SGLang's app."""
    from sglang.srt.entrypoints import http_server

    port_args = kwargs.get("port_args", args[3] if len(args) > 3 else None)
    run_dir = context.get().options.run_dir
    if port_args is None or not run_dir:
        log.warning("sglang_elastic: drain routes not mounted (no RPC channel or run folder)")
        return None
    install_routes(http_server.app, DrainController(RpcEngine(port_args.rpc_ipc_name, run_dir)))
    log.info("sglang_elastic: POST /elastic_ep/drain and GET /elastic_ep/status mounted")
    return None


# ----------------------------------------------------------------------------- scheduler side
def after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on ``Scheduler.__init__``: the drain step, callable by SGLang's RPC dispatch; EP
    rank 0 publishes the cluster view (the model and its expert metadata exist by now)."""
    setattr(scheduler, RPC_METHOD, partial(drain_step, scheduler))
    from .state import _publish_view

    _publish_view()


def drain_step(scheduler: Any, drain_id: str, ranks: str, step: int) -> None:
    """One drain step on this scheduler (``ranks``: ``"3,5"``; RPC parameters are flat scalars).

    Raises (the RPC then answers failure with the message) when the drain cannot proceed.
    """
    ctx = context.get()
    sd = ctx.scheduler_drain
    if sd is None:
        sd = ctx.scheduler_drain = _scheduler_drain(scheduler)
    try:
        sd.step(drain_id, [int(r) for r in ranks.split(",") if r], int(step))
    except DrainError as exc:
        raise RuntimeError(f"{exc.status}: {exc.message}") from None


def _scheduler_drain(scheduler: Any) -> SchedulerDrain:
    import torch.distributed as dist
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    from ..state import ElasticEPStateManager

    state = ElasticEPStateManager.instance()
    meta = get_global_expert_location_metadata()
    if state is None or meta is None:
        raise RuntimeError("elastic EP is not enabled on this server (start it with --elastic-ep-backend)")
    ctx = context.get()
    writer = dist.get_rank() == 0 if dist.is_initialized() else True
    run_dir = ctx.options.run_dir

    def on_progress(p: DrainProgress) -> None:
        if writer and run_dir:
            write_status(run_dir, DRAIN_FILE, p.as_dict())
            publish_cluster_view(sd.view())

    sd = SchedulerDrain(state, lambda: get_global_expert_location_metadata().physical_to_logical_map_cpu,
                        partial(_apply_chunk, scheduler), meta.num_logical_experts,
                        get_load=lambda: ctx.last_load, on_progress=on_progress, num_ranks=meta.ep_size)
    return sd


def cluster_view() -> Optional[ClusterView]:
    """This process's view of the cluster (our state and SGLang's metadata), or None before both exist."""
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    from ..state import ElasticEPStateManager

    state = ElasticEPStateManager.instance()
    try:
        meta = get_global_expert_location_metadata()
    except context.NOT_PUBLISHED:  # no runtime context published in this process (a tool, a test)
        meta = None
    if state is None or meta is None:
        return None
    R = meta.ep_size  # the placement's ranks (the state may be larger: --max-ep-size)
    return ClusterView(R, tuple(r for r in state.live_ranks() if r < R), meta.physical_to_logical_map_cpu.shape[1] // R,
                       meta.num_logical_experts, state.epoch)


def publish_cluster_view(view: Optional[ClusterView] = None) -> None:
    """Write the cluster view the HTTP side checks drain requests against (EP rank 0, on every change)."""
    run_dir = context.get().options.run_dir
    view = view if view is not None else cluster_view()
    if run_dir and view is not None:
        write_status(run_dir, STATE_FILE, {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(view).items()})


def _apply_chunk(scheduler: Any, target: Any, layers: List[int]) -> None:
    """Move ``layers`` to ``target`` through SGLang's update entry point (our updater behind it).

    The new metadata routes only to ``target``'s slots (drained ranks' filler slots left out), as
    EPLBManager.rebalance would call it, one chunk.
    """
    from sglang.srt.eplb.eplb_manager import update_expert_location_with_recovery
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.model_executor.model_runner_components.moe_ep_setup import init_lplb_solvers
    from sglang.srt.runtime_context import get_exec, get_parallel

    from ..eplb.placement import Placement
    from .updater_io import patch_metadata_row as _patch_metadata_row

    mr = scheduler.tp_worker.model_runner
    rank = get_parallel().tp_rank
    meta = ExpertLocationMetadata.init_by_mapping(mr.model_config, target.to_sglang()[0], moe_ep_rank=rank)
    for layer in range(target.num_layers):
        _patch_metadata_row(meta, layer, Placement(target.phy2log[layer:layer + 1], target.num_ranks,
                                                   target.num_logical_experts), rank)
    update_expert_location_with_recovery(
        expert_location_updater=mr.expert_location_updater, model=mr.model, new_expert_location_metadata=meta,
        update_layer_ids=list(layers), tp_rank=rank, expert_backup_client=getattr(mr, "expert_backup_client", None),
        update_weights_from_disk_callable=mr.weight_updater.update_weights_from_disk,
        ep_dispatch_algorithm=get_exec().moe.ep_dispatch_algorithm,
        init_lplb_solvers_callable=lambda: init_lplb_solvers(model_config=mr.model_config))

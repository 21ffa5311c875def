"""Prometheus series of the elastic state: one small class, usable on any ``CollectorRegistry``.

Two ways to be scraped:

* **Private registry** (the rehearsal orchestrator): ``m = ElasticMetrics(CollectorRegistry())``,
  update it, and ``serve(m.registry, port)`` answers ``GET /metrics`` on ``127.0.0.1:port``.
* **SGLang with ``--enable-metrics``**: SGLang runs ``prometheus_client`` in multiprocess mode (its
  launcher sets ``PROMETHEUS_MULTIPROC_DIR`` before starting the schedulers, and its ``/metrics``
  route reads every process's files through ``MultiProcessCollector``). :func:`for_this_process`
  builds the series on the default registry there, so their values land in that folder and appear
  in SGLang's own ``/metrics``. Gauges use ``mostrecent`` (every rank holds the same agreed view);
  counters and histograms are summed over processes, so each event must be counted by one process
  only (the SGLang plugin counts cluster-wide events on the lowest live rank, per-rank quantities
  such as bytes received on every rank).

``prometheus_client`` is imported inside the functions: it chooses its multiprocess value class
when first imported, which must happen after SGLang has set ``PROMETHEUS_MULTIPROC_DIR``.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Optional, Tuple

__all__ = ["ElasticMetrics", "MetricsServer", "serve", "render", "for_this_process", "multiprocess_dir",
           "FAILOVER_BUCKETS", "PAUSE_BUCKETS", "SERIES"]

# Seconds from a rank's death to serving again at full placement (retry + re-plan + weights moved).
FAILOVER_BUCKETS: Tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds a forward pass waited on one rebalance step (the layerwise updater's pause).
PAUSE_BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# Exposed names (what a scrape shows; counters carry prometheus' ``_total`` suffix).
SERIES: Tuple[str, ...] = (
    "sglang_elastic_live_ranks",
    "sglang_elastic_epoch",
    "sglang_elastic_rank_failures_total",
    "sglang_elastic_failover_seconds",
    "sglang_elastic_expert_bytes_moved_total",
    "sglang_elastic_rebalance_pause_seconds",
    "sglang_elastic_balancedness",
    "sglang_elastic_degraded_tokens_total",
    "sglang_elastic_orphans_restored_total",
)


def multiprocess_dir() -> Optional[str]:
    """``PROMETHEUS_MULTIPROC_DIR`` when set (SGLang sets it with ``--enable-metrics``), else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _count(n: Any, what: str) -> float:
    """``n`` as a finite number >= 0; ``ValueError`` naming ``what`` otherwise (a counter never goes down)."""
    v = float(n)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {n!r}")
    return v


class ElasticMetrics:
    """The nine ``sglang_elastic_*`` series on one registry.

    Args:
        registry: where the series are registered; ``None`` means prometheus_client's default
            ``REGISTRY`` (what SGLang's multiprocess ``/metrics`` reads). Two instances cannot share
            one registry (prometheus_client refuses duplicate names).

    Every method is cheap (a lock and an add) and thread-safe; values must be finite.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = REGISTRY if registry is None else registry
        reg = dict(registry=self.registry)
        self.live_ranks = Gauge("sglang_elastic_live_ranks", "EP ranks alive in the elastic state",
                                multiprocess_mode="mostrecent", **reg)
        self.epoch = Gauge("sglang_elastic_epoch", "Epoch of the elastic state (one bump per live-set change)",
                           multiprocess_mode="mostrecent", **reg)
        self.rank_failures = Counter("sglang_elastic_rank_failures", "EP ranks declared dead, by reason",
                                     ["reason"], **reg)
        self.failover_seconds = Histogram("sglang_elastic_failover_seconds",
                                          "Seconds from a rank's death to serving on the repaired placement",
                                          buckets=FAILOVER_BUCKETS, **reg)
        self.expert_bytes_moved = Counter("sglang_elastic_expert_bytes_moved",
                                          "Expert-weight bytes received by rebalances and recoveries", **reg)
        self.rebalance_pause_seconds = Histogram("sglang_elastic_rebalance_pause_seconds",
                                                 "Seconds serving paused for one rebalance step",
                                                 buckets=PAUSE_BUCKETS, **reg)
        self.balancedness = Gauge("sglang_elastic_balancedness",
                                  "Mean over layers of mean/max rank load of the placement in force (1 = perfect)",
                                  multiprocess_mode="mostrecent", **reg)
        self.degraded_tokens = Counter("sglang_elastic_degraded_tokens",
                                       "Tokens routed to a fallback expert because their expert had no live replica",
                                       **reg)
        self.orphans_restored = Counter("sglang_elastic_orphans_restored",
                                        "Experts with no live replica restored from a peer's host backup", **reg)

    # ---------------------------------------------------------------- membership
    def set_membership(self, live_ranks: int, epoch: int) -> None:
        """The live-rank count and the epoch after a change of the live set."""
        self.live_ranks.set(_count(live_ranks, "live_ranks"))
        self.epoch.set(_count(epoch, "epoch"))

    def rank_failed(self, reason: str, n: int = 1) -> None:
        """Count ``n`` ranks declared dead for ``reason`` (keep reasons few: ``killed``, ``timeout``...)."""
        self.rank_failures.labels(reason=str(reason) or "unknown").inc(_count(n, "n"))

    def observe_failover(self, seconds: float) -> None:
        """One failover's duration, death to serving on the repaired placement."""
        self.failover_seconds.observe(_count(seconds, "seconds"))

    # ---------------------------------------------------------------- placement
    def add_bytes_moved(self, n: int) -> None:
        """Expert-weight bytes this process received."""
        self.expert_bytes_moved.inc(_count(n, "bytes"))

    def observe_rebalance_pause(self, seconds: float) -> None:
        """One rebalance step's pause of serving."""
        self.rebalance_pause_seconds.observe(_count(seconds, "seconds"))

    def set_balancedness(self, value: float) -> None:
        """Balancedness of the placement in force (0..1]."""
        self.balancedness.set(_count(value, "balancedness"))

    def add_degraded_tokens(self, n: int) -> None:
        """Tokens served by a fallback because their expert had no live replica."""
        self.degraded_tokens.inc(_count(n, "tokens"))

    def add_orphans_restored(self, n: int) -> None:
        """Experts restored from a host backup after all their replicas died."""
        self.orphans_restored.inc(_count(n, "experts"))


def render(registry: Any) -> str:
    """The text exposition of ``registry`` (what ``/metrics`` answers)."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode("utf-8")


class MetricsServer:
    """A running ``/metrics`` endpoint; :attr:`port` is the bound port, :meth:`close` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(registry: Any, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread (``port=0``: any free port).

    Raises ``OSError`` when the port cannot be bound.
    """
    from prometheus_client import start_http_server

    server, thread = start_http_server(int(port), addr=host, registry=registry)
    return MetricsServer(server, thread)


_process_metrics: Optional[ElasticMetrics] = None
_process_lock = threading.Lock()


def for_this_process() -> ElasticMetrics:
    """This process's series on the default registry (created on first call; the same object after).

    In an SGLang process started with ``--enable-metrics`` they are written to
    ``PROMETHEUS_MULTIPROC_DIR`` and appear in SGLang's ``/metrics``. Call it only after that
    variable is set (SGLang's launcher sets it before starting the schedulers).
    """
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            _process_metrics = ElasticMetrics(None)
        return _process_metrics

"""sglang_elastic.metrics: the nine series on a private registry, served over HTTP, and in
prometheus_client's multiprocess mode (how SGLang's /metrics reads them)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sglang_elastic.metrics import SERIES, ElasticMetrics, render, serve


def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def _fill(m: ElasticMetrics) -> None:
    m.set_membership(live_ranks=3, epoch=2)
    m.rank_failed("killed")
    m.rank_failed("killed")
    m.rank_failed("timeout")
    m.observe_failover(0.3)
    m.add_bytes_moved(4096)
    m.observe_rebalance_pause(0.002)
    m.set_balancedness(0.91)
    m.add_degraded_tokens(17)
    m.add_orphans_restored(2)


def test_private_registry_has_every_series_with_its_value():
    m = ElasticMetrics(CollectorRegistry())
    _fill(m)
    s = _samples(render(m.registry))
    for name in SERIES:
        assert any(k == name or k.startswith(name + "{") or k.startswith(name + "_") for k in s), name
    assert s["sglang_elastic_live_ranks"] == 3
    assert s["sglang_elastic_epoch"] == 2
    assert s["sglang_elastic_rank_failures_total{reason=killed}"] == 2
    assert s["sglang_elastic_rank_failures_total{reason=timeout}"] == 1
    assert s["sglang_elastic_failover_seconds_count"] == 1
    assert s["sglang_elastic_failover_seconds_sum"] == pytest.approx(0.3)
    assert s["sglang_elastic_expert_bytes_moved_total"] == 4096
    assert s["sglang_elastic_rebalance_pause_seconds_count"] == 1
    assert s["sglang_elastic_balancedness"] == pytest.approx(0.91)
    assert s["sglang_elastic_degraded_tokens_total"] == 17
    assert s["sglang_elastic_orphans_restored_total"] == 2


def test_two_instances_on_private_registries_are_independent():
    a, b = ElasticMetrics(CollectorRegistry()), ElasticMetrics(CollectorRegistry())
    a.add_bytes_moved(10)
    assert _samples(render(b.registry))["sglang_elastic_expert_bytes_moved_total"] == 0


@pytest.mark.parametrize("call, message", [
    (lambda m: m.add_bytes_moved(-1), "bytes must be a finite number >= 0, got -1"),
    (lambda m: m.observe_failover(float("nan")), "seconds must be a finite number >= 0, got nan"),
    (lambda m: m.set_balancedness(float("inf")), "balancedness must be a finite number >= 0, got inf"),
])
def test_bad_values_are_refused_by_name(call, message):
    m = ElasticMetrics(CollectorRegistry())
    with pytest.raises(ValueError) as e:
        call(m)
    assert str(e.value) == message


def test_serve_answers_metrics_on_localhost():
    m = ElasticMetrics(CollectorRegistry())
    _fill(m)
    with serve(m.registry, 0) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        text = urllib.request.urlopen(srv.url, timeout=10).read().decode()
        m.rank_failed("killed")
        again = urllib.request.urlopen(srv.url, timeout=10).read().decode()
    assert _samples(text)["sglang_elastic_rank_failures_total{reason=killed}"] == 2
    assert _samples(again)["sglang_elastic_rank_failures_total{reason=killed}"] == 3


def test_multiprocess_mode_sums_counters_and_keeps_latest_gauge(tmp_path):
    """Two processes write with PROMETHEUS_MULTIPROC_DIR set (as SGLang's schedulers do); a
    MultiProcessCollector (what SGLang's /metrics mounts) sees the sum and the latest gauge."""
    child = textwrap.dedent("""
        import sys
        from sglang_elastic.metrics import for_this_process
        m = for_this_process()
        assert for_this_process() is m
        m.set_membership(live_ranks=int(sys.argv[1]), epoch=int(sys.argv[2]))
        m.add_bytes_moved(100)
        m.rank_failed("killed")
    """)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for live, epoch in ((4, 1), (3, 2)):
        subprocess.run([sys.executable, "-c", child, str(live), str(epoch)], env=env, check=True, timeout=120)
    reader = textwrap.dedent("""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    text = subprocess.run([sys.executable, "-c", reader], env=env, check=True, capture_output=True, text=True,
                          timeout=120).stdout
    s = _samples(text)
    assert s["sglang_elastic_expert_bytes_moved_total"] == 200
    assert s["sglang_elastic_rank_failures_total{reason=killed}"] == 2
    assert s["sglang_elastic_live_ranks"] == 3 and s["sglang_elastic_epoch"] == 2

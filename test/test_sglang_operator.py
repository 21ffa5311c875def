"""The operator surface against real SGLang 0.5.23 (CPU, in .venv-sglang like test_sglang_plugin.py):
the drain routes on SGLang's FastAPI app through SGLang's RPC dispatch, and our metrics in SGLang's
multiprocess /metrics. Checks live in test/_sglang_operator_checks.py."""
from __future__ import annotations

from pathlib import Path

from test_sglang_plugin import _checks, _run

CHECKS = Path(__file__).resolve().parent / "_sglang_operator_checks.py"


def test_drain_routes_on_sglang_app(tmp_path):
    """Bad bodies get 400/422 with the reason; a drain runs step by step over SGLang's RPC handling
    (a second drain gets 409, the same one 202), masks the rank, and a repeat is a 200 no-op."""
    out = _run([CHECKS, "drain", tmp_path], tmp_path)
    assert _checks(out) == ["CHECK drain (SGLang FastAPI app, SGLang RPC dispatch, our state) ok"], out[-4000:]


def test_metrics_appear_in_sglang_metrics(tmp_path):
    """A spawned scheduler-like process records through the plugin; SGLang's own /metrics mount
    (MultiProcessCollector) shows every sglang_elastic_* series with its value."""
    out = _run([CHECKS, "metrics", tmp_path], tmp_path)
    assert _checks(out) == ["CHECK metrics (SGLang multiprocess /metrics) ok"], out[-4000:]

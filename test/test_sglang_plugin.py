"""The SGLang plugin against real SGLang 0.5.23 (CPU).

SGLang's dispatcher modules import torchvision, which cannot sit beside this venv's CPU torch, so
the SGLang-side checks run in ``.venv-sglang`` (built by ``bash .ci/setup --test``) as real
subprocesses: test/_sglang_plugin_checks.py. The working directory of each is a temporary folder,
so they see the installed (editable) package and its entry point, not the repo root.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_elastic.sglang_plugin import options

ROOT = Path(__file__).resolve().parent.parent
SGL_PY = ROOT / ".venv-sglang" / "bin" / "python"
CHECKS = ROOT / "test" / "_sglang_plugin_checks.py"


def _python() -> str:
    if not SGL_PY.exists():
        pytest.fail(f"{SGL_PY} is missing: the SGLang plugin tests need the second venv; run `bash .ci/setup --test`")
    return str(SGL_PY)


def _run(args, tmp_path, timeout=300) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SGLANG_ELASTIC_") and k not in ("SGLANG_PLUGINS", "PYTHONPATH")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([_python()] + [str(a) for a in args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


def _checks(out: str):
    return [line for line in out.splitlines() if line.startswith("CHECK ")]


def test_launch_server_help_lists_our_flags(tmp_path):
    out = _run(["-m", "sglang.launch_server", "--help"], tmp_path)
    assert options.GROUP_TITLE in out
    for flag, _, _ in options.FLAGS.values():
        assert flag in out, flag
    for theirs in ("--eplb-algorithm", "--moe-a2a-backend", "--elastic-ep-backend"):
        assert theirs in out  # SGLang's own flags are still there


def test_parse_names_eplb_and_dispatcher(tmp_path):
    """Parse the launch command; names resolve to ours everywhere; the scheduler hook readies the EPLB
    kernels where our EPLB may be called (only there); SGLang's rebalance_experts and
    init_by_eplb give our placements with our dead ranks; the dispatcher adapter round-trips."""
    out = _run([CHECKS, "inproc", tmp_path], tmp_path)
    names = [c.split()[1] for c in _checks(out)]
    assert names == ["parse", "names", "warm_up", "rebalance_experts", "init_by_eplb", "dispatcher"], out[-4000:]
    assert "[sglang_elastic] EPLB elasticity_aware: balancedness=" in out


def test_unsupported_version_and_plugin_filter_patch_nothing(tmp_path):
    out = _run([CHECKS, "gate"], tmp_path)
    assert [c.split()[1] for c in _checks(out)] == ["SGLANG_PLUGINS", "version"], out[-4000:]


def test_sglang_update_entry_point_runs_our_updater_over_gloo(tmp_path):
    """3 processes: SGLang's update_expert_location_with_recovery with our updater; rank 2 dies, its
    experts come from live replicas and (the one it alone held) from the backup store, bit-exact."""
    out = _run([CHECKS, "updater", tmp_path], tmp_path)
    assert _checks(out) == ["CHECK updater (gloo, dead source, orphan from backup) ok"], out[-4000:]
    assert "restored_from_backup=1" in out and "missing_reloaded_from_disk={}" in out


BG_CHECKS = ROOT / "test" / "_sglang_background_checks.py"


@pytest.mark.parametrize("mode", ["background", "synchronous"])
def test_eplb_manager_drives_the_background_bridge(tmp_path, mode):
    """SGLang's EPLBManager.on_forward_pass_end (our AROUND hook applied) drives a 3-layer rebalance
    one layer per pass, 3 processes over gloo: background: layers commit at later passes (the last
    through the hook after SGLang's last update()); synchronous: each inside its update(). At every
    pass every slot the routing table can route to holds its expert's weights; weights, metadata and
    table end at the target; staging freed."""
    out = _run([BG_CHECKS, mode, tmp_path], tmp_path)
    assert _checks(out) == [f"CHECK background bridge ({mode}) ok"], out[-4000:]
    assert ("committed in background" in out) == (mode == "background"), out[-4000:]


def test_bad_background_option_is_one_line(monkeypatch):
    for k in list(os.environ):
        if k.startswith(options.ENV_PREFIX):
            monkeypatch.delenv(k)
    assert options.current().elastic_eplb_background is True
    monkeypatch.setenv("SGLANG_ELASTIC_ELASTIC_EPLB_BACKGROUND", "0")
    assert options.current().elastic_eplb_background is False
    monkeypatch.setenv("SGLANG_ELASTIC_ELASTIC_EPLB_BACKGROUND", "maybe")
    with pytest.raises(ValueError) as exc:
        options.current()
    assert str(exc.value) == ("SGLANG_ELASTIC_ELASTIC_EPLB_BACKGROUND='maybe' (from --elastic-eplb-background): "
                              "expected true/false, got 'maybe'")


def test_options_from_environment(monkeypatch):
    for k in list(os.environ):
        if k.startswith(options.ENV_PREFIX):
            monkeypatch.delenv(k)
    assert options.current() == options.PluginOptions()
    monkeypatch.setenv("SGLANG_ELASTIC_EPLB_BALANCE_TOLERANCE", "0.01")
    monkeypatch.setenv("SGLANG_ELASTIC_ELASTIC_BACKUP_STORE", "0")
    o = options.current()
    assert (o.eplb_balance_tolerance, o.elastic_backup_store) == (0.01, False)
    monkeypatch.setenv("SGLANG_ELASTIC_ELASTIC_DISPATCH_PATH", "pcie")
    with pytest.raises(ValueError, match="--elastic-dispatch-path"):
        options.current()


def test_plugin_package_imports_without_sglang():
    """Importing the plugin package must not import sglang (only register() does, lazily)."""
    code = "import sys, sglang_elastic.sglang_plugin as p; assert 'sglang' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_degraded_tokens_flush_counts_each_layer_once():
    """The flush adds, per MoE layer, its adapters' counts (two-batch-overlap halves), takes the most any
    layer saw (a token degraded in many layers counts once), and reads each adapter's counter once."""
    from prometheus_client import CollectorRegistry

    from sglang_elastic.metrics import ElasticMetrics
    from sglang_elastic.sglang_plugin.context import PluginContext

    class Adapter:
        def __init__(self, layer_id, counts):
            self.layer_id, self.counts = layer_id, list(counts)

        def take_degraded_tokens(self):
            return self.counts.pop(0) if self.counts else 0

    ctx = PluginContext()
    ctx._metrics = ElasticMetrics(CollectorRegistry())
    adapters = [Adapter(0, [3, 1]), Adapter(0, [4]), Adapter(1, [6, 2]), Adapter(None, [5])]
    for a in adapters:
        ctx.dispatchers.add(a)
    assert ctx.flush_degraded_tokens() == 7  # layer 0: 3 + 4; layer 1: 6; no layer id: 5
    assert ctx.flush_degraded_tokens() == 2
    assert ctx.flush_degraded_tokens() == 0
    assert ctx._metrics.registry.get_sample_value("sglang_elastic_degraded_tokens_total") == 9

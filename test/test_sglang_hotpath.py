"""The hot path through real SGLang 0.5.23 (CPU): our routing rule at SGLang's logical -> physical map step,
one routing launch per MoE layer per step, the adapter adding no ops to the inner dispatcher's (under
torch.profiler), and a known death reaching nixl_ep's mask before any call.

Runs test/_sglang_hotpath_checks.py in ``.venv-sglang`` (SGLang's dispatcher modules need torchvision,
which cannot sit beside this venv's CPU torch), as test/test_sglang_plugin.py does.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SGL_PY = ROOT / ".venv-sglang" / "bin" / "python"
CHECKS = ROOT / "test" / "_sglang_hotpath_checks.py"


def test_hot_path_in_sglang(tmp_path):
    if not SGL_PY.exists():
        pytest.fail(f"{SGL_PY} is missing: the SGLang plugin tests need the second venv; run `bash .ci/setup --test`")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SGLANG_ELASTIC_") and k not in ("SGLANG_PLUGINS", "PYTHONPATH")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([str(SGL_PY), str(CHECKS), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    names = [line.split(" ", 2)[1] for line in out.splitlines() if line.startswith("CHECK ")]
    assert names == ["hooks", "rule", "one", "profiler:", "death:", "degraded", "updater:", "new"], out[-4000:]

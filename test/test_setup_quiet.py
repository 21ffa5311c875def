""".ci/setup's pip filter: the resolver report about the --no-deps installs is dropped, real
errors and other conflicts stay (the full setup is not re-run here)."""
from __future__ import annotations

import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parent.parent / ".ci" / "setup"

NOISY = """\
WARNING: Location 'file:///index' is ignored: it is either a non-existing path or lacks a specific scheme.
ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. This behaviour is the source of the following dependency conflicts.
sglang 0.5.23 requires aiohttp, which is not installed.
sglang 0.5.23 requires torch==2.9.1, but you have torch 2.13.0 which is incompatible.
nixl-cu12 1.5.1 requires torch, which is not installed.
nixl 1.5.1 requires nixl-cu12==1.5.1, but you have nixl-cu12 1.5.2 which is incompatible.
"""

REAL = """\
ERROR: Could not find a version that satisfies the requirement torch==9.9 (from versions: none)
ERROR: No matching distribution found for torch==9.9
vllm 0.9.0 requires torch==2.7.0, but you have torch 2.13.0 which is incompatible.
"""


def _filter(text: str) -> str:
    out = subprocess.run(["bash", str(SETUP), "--filter-pip-output"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_resolver_noise_about_no_deps_installs_is_dropped():
    assert _filter(NOISY) == ""


def test_real_errors_and_other_conflicts_stay():
    assert _filter(NOISY + REAL) == REAL

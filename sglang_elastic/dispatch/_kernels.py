"""``sglang_elastic.kernels`` for the dispatch package, also from a source checkout that was not installed.

setup.py installs the top-level ``kernels/`` folder as ``sglang_elastic.kernels`` (``package_dir``).
Run from a bare checkout (``PYTHONPATH=.``, as on the GPU machines) that name does not exist, so the
folder is loaded under it from the tree. Either way the dependency goes one way: ``dispatch`` imports
``kernels``; ``kernels`` imports only torch (and Triton, lazily).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__all__ = ["kernels"]


def _load():
    try:
        return importlib.import_module("sglang_elastic.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "sglang_elastic.kernels":
            raise
    root = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location("sglang_elastic.kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    if spec is None or not (root / "__init__.py").exists():
        raise ImportError(f"sglang_elastic.kernels is not installed and {root} does not exist: pip install -e .")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sglang_elastic.kernels"] = mod
    spec.loader.exec_module(mod)
    import sglang_elastic

    sglang_elastic.kernels = mod
    return mod


kernels = _load()

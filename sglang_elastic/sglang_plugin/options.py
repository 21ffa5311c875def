"""The ``launch_server`` flags the plugin adds, and how their values reach every SGLang process.

SGLang builds its ``ServerArgs`` record from the dataclass fields only (``from_cli_args`` drops any
other attribute of the parsed namespace) and seals it, so our values cannot ride on the record.
They travel as environment variables instead: the hook on ``ServerArgs.from_cli_args`` exports
each flag the operator gave as ``SGLANG_ELASTIC_<NAME>``; scheduler, DP-controller and detokenizer
processes are started by the launcher and inherit its environment, and :func:`current` reads it
there. Setting the variables directly works too (``sglang.Engine`` from Python, or a flag-less
launch).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["PluginOptions", "FLAGS", "ENV_PREFIX", "add_cli_args", "export_from_namespace", "current",
           "after_add_cli_args", "after_from_cli_args"]

log = logging.getLogger(__name__)

ENV_PREFIX = "SGLANG_ELASTIC_"
GROUP_TITLE = "sglang-elastic (plugin)"


@dataclass(frozen=True)
class PluginOptions:
    """Values of the plugin's flags (defaults apply when a flag was not given).

    Attributes:
        eplb_min_balance: our algorithm's movement/balance trade-off, as the fraction of a from-scratch
            placement's balancedness to keep at least (``None``: its own default, 0.99 after a live-set
            change and 1.0 for a periodic rebalance).
        eplb_balance_tolerance: the same trade-off as a relative excess of the busiest rank (give one).
        eplb_balance_reference: what that fraction is of: ``greedy`` (DeepSeek's greedy from-scratch
            placement, upstream's) or ``bound`` (a lower bound of any placement's busiest rank);
            ``None``: the algorithm's default (greedy after a live-set change, bound otherwise).
        eplb_max_swaps: cap on improvement swaps per layer (``None``: the algorithm's default).
        eplb_movement_aware: feed the placement in force to the algorithm so it moves few experts.
        elastic_transfer_backend: byte mover for expert weights (``auto``: the ``--elastic-ep-backend``
            when it is nixl or mooncake, else torch).
        elastic_transfer_timeout: seconds a weight transfer waits for a silent peer.
        elastic_backup_store: keep one host-memory copy of every expert on another rank.
        elastic_dispatch_path: ``gpu`` (NIXL-EP / Mooncake EP kernels) or ``host`` (agents).
        elastic_dispatch_timeout: seconds a dispatch/combine waits for a silent peer.
        elastic_eplb_background: SGLang's periodic EPLB moves each chunk beside serving (our
            background updater: a forward pass pays the commit only); off: each chunk moves and
            commits inside its ``update()`` call, as upstream.
        run_dir: folder the schedulers publish the elastic state and drain progress to, for the HTTP
            process (not a flag: the launcher makes one per server, ``SGLANG_ELASTIC_RUN_DIR``).
    """

    eplb_min_balance: Optional[float] = None
    eplb_balance_tolerance: Optional[float] = None
    eplb_balance_reference: Optional[str] = None
    eplb_max_swaps: Optional[int] = None
    eplb_movement_aware: bool = True
    elastic_transfer_backend: str = "auto"
    elastic_transfer_timeout: float = 30.0
    elastic_backup_store: bool = True
    elastic_dispatch_path: str = "gpu"
    elastic_dispatch_timeout: float = 5.0
    elastic_eplb_background: bool = True
    run_dir: Optional[str] = None


def _nonneg_float(text: str) -> float:
    v = float(text)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    v = float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _balance_reference(text: str) -> str:
    t = text.strip().lower()
    if t not in ("greedy", "bound"):
        raise ValueError(f"expected greedy or bound, got {text!r}")
    return t


# field -> (flag, parser of the text form, argparse kwargs). Booleans get --flag / --no-flag.
FLAGS: Dict[str, Tuple[str, Callable[[str], Any], Dict[str, Any]]] = {
    "eplb_min_balance": ("--eplb-min-balance", _fraction, dict(
        metavar="FRAC",
        help="elasticity_aware EPLB: the movement/balance trade-off, as at least this fraction of the "
             "balancedness a from-scratch placement reaches, with the fewest moves. 1.0 asks for "
             "from-scratch balance; 0.99 keeps more experts in place for up to ~1%% less balance. "
             "Default: 0.99 after a rank failure or scale, 1.0 for periodic rebalances.")),
    "eplb_balance_tolerance": ("--eplb-balance-tolerance", _nonneg_float, dict(
        metavar="FRAC",
        help="elasticity_aware EPLB: the same trade-off as how much busier (relative) a layer's busiest "
             "rank may be than in a from-scratch placement (min balance = 1 / (1 + tolerance)); give "
             "this or --eplb-min-balance.")),
    "eplb_balance_reference": ("--eplb-balance-reference", _balance_reference, dict(
        metavar="{greedy,bound}",
        help="elasticity_aware EPLB: what --eplb-min-balance is a fraction of: the balancedness of "
             "DeepSeek's greedy from-scratch placement, i.e. upstream's (greedy), or a lower bound of any "
             "placement's busiest rank (bound: more movement on skewed loads). Default: greedy after a "
             "rank failure or scale, bound for periodic rebalances.")),
    "eplb_max_swaps": ("--eplb-max-swaps", _nonneg_int, dict(
        metavar="N", help="elasticity_aware EPLB: cap on improvement swaps per layer (default: "
                          "2 x live ranks + 4 x slots per rank + 16).")),
    "eplb_movement_aware": ("--eplb-movement-aware", _bool, dict(
        help="elasticity_aware EPLB: start from the placement in force so a rebalance moves few experts "
             "(default on; --no-eplb-movement-aware recomputes from scratch like upstream).")),
    "elastic_transfer_backend": ("--elastic-transfer-backend", str, dict(
        choices=("auto", "torch", "nixl", "mooncake"),
        help="Byte mover for expert weights during EPLB and recovery (default auto: the "
             "--elastic-ep-backend when it is nixl or mooncake, else torch.distributed).")),
    "elastic_transfer_timeout": ("--elastic-transfer-timeout", _pos_float, dict(
        metavar="SEC", help="Seconds an expert-weight transfer waits for a silent peer before the "
                            "peer counts as failed (default 30).")),
    "elastic_backup_store": ("--elastic-backup-store", _bool, dict(
        help="Keep one host-memory copy of every (layer, expert) on a rank that does not serve it, so "
             "an expert whose replicas all die is restored from a peer instead of disk (default on).")),
    "elastic_dispatch_path": ("--elastic-dispatch-path", str, dict(
        choices=("gpu", "host"),
        help="Token dispatch for --moe-a2a-backend nixl|mooncake: gpu (NIXL-EP / Mooncake EP kernels, "
             "default) or host (NIXL agent / Mooncake TransferEngine one-sided writes).")),
    "elastic_dispatch_timeout": ("--elastic-dispatch-timeout", _pos_float, dict(
        metavar="SEC", help="Seconds a dispatch/combine waits for a silent peer before masking it "
                            "(default 5).")),
    "elastic_eplb_background": ("--elastic-eplb-background", _bool, dict(
        help="Periodic EPLB (--eplb-rebalance-layers-per-chunk): each chunk's expert weights move on a "
             "transport thread while forward passes go on; a later forward pass commits it (weights "
             "and routing together). Default on; --no-elastic-eplb-background moves and commits each "
             "chunk inside SGLang's update call. The fault path, drains and post-scale rebalances are "
             "always synchronous.")),
}


def env_name(field_name: str) -> str:
    """Environment variable carrying ``field_name`` (``SGLANG_ELASTIC_EPLB_BALANCE_TOLERANCE``...)."""
    return ENV_PREFIX + field_name.upper()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's flags to SGLang's parser, in their own ``--help`` group.

    Defaults stay ``None`` so that only flags the operator gave are exported. A flag SGLang already
    defines (a future upstream version) is left to SGLang, with a warning.
    """
    taken = set(parser._option_string_actions)  # argparse has no public lookup
    group = parser.add_argument_group(GROUP_TITLE, "Flags added by the sglang_elastic plugin (see docs/sglang.md).")
    for name, (flag, conv, kw) in FLAGS.items():
        if flag in taken:
            log.warning("sglang_elastic: SGLang already defines %s; the plugin's flag is not added", flag)
            continue
        if conv is _bool:
            group.add_argument(flag, dest=f"sglang_elastic_{name}", action=argparse.BooleanOptionalAction,
                               default=None, help=kw["help"])
        else:
            group.add_argument(flag, dest=f"sglang_elastic_{name}", type=conv, default=None, **kw)


def export_from_namespace(args: argparse.Namespace) -> Dict[str, str]:
    """Export the flags set in ``args`` as environment variables (inherited by SGLang's subprocesses).

    Returns what was exported.
    """
    out = {}
    for name in FLAGS:
        v = getattr(args, f"sglang_elastic_{name}", None)
        if v is None:
            continue
        text = ("1" if v else "0") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)
        os.environ[env_name(name)] = text
        out[env_name(name)] = text
    return out


def current() -> PluginOptions:
    """The options in force in this process (flags exported by the launcher, else defaults).

    The one reader of the ``SGLANG_ELASTIC_*`` variables; the plugin's code reads the options once
    through its context (``context.get().options``), which calls this. Raises ``ValueError`` naming the variable when one holds a bad value.
    """
    kw: Dict[str, Any] = {}
    for f in fields(PluginOptions):
        text = os.environ.get(env_name(f.name))
        if text is None or text == "":
            continue
        if f.name not in FLAGS:  # set by the launcher, not by a flag
            kw[f.name] = text
            continue
        flag, conv, extra = FLAGS[f.name]
        try:
            v = conv(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{env_name(f.name)}={text!r} (from {flag}): {exc}") from None
        if "choices" in extra and v not in extra["choices"]:
            raise ValueError(f"{env_name(f.name)}={text!r} (from {flag}): choose one of {extra['choices']}")
        kw[f.name] = v
    if kw.get("eplb_min_balance") is not None and kw.get("eplb_balance_tolerance") is not None:
        raise ValueError("give --eplb-min-balance or --eplb-balance-tolerance, not both")
    return PluginOptions(**kw)


def after_add_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    """AFTER hook on ``ServerArgs.add_cli_args(parser)`` (a staticmethod)."""
    add_cli_args(parser)


def after_from_cli_args(result: Any, *args: Any) -> None:
    """AFTER hook on ``ServerArgs.from_cli_args(cls, namespace)`` (a classmethod): export our flags.

    Returns None so SGLang keeps its own result.
    """
    ns = next((a for a in args if isinstance(a, argparse.Namespace)), None)
    if ns is not None:
        export_from_namespace(ns)
        if not os.environ.get(env_name("run_dir")):
            os.environ[env_name("run_dir")] = tempfile.mkdtemp(prefix="sglang-elastic-")
        from . import context  # lazily: context imports this module

        context.get().reload_options()

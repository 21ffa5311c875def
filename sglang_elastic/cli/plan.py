"""``sglang-elastic plan``.

``plan`` computes an expert placement for a recorded (or synthetic) load on the live ranks, reports
balance, movement and orphans against the placement in force, and writes the placement in SGLang's
``--init-expert-location`` format. Every bad input ends in one line on stderr,
``sglang-elastic plan: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..eplb.algorithms import ALGORITHMS, rebalance
from ..eplb.io import load_expert_load, read_data_file
from ..eplb.metrics import balancedness, layer_balancedness, movement, orphans, rank_load
from ..eplb.placement import Placement, PlacementError, save_placement_file
from ..eplb.synthetic import SYNTHETIC_LOADS, synthetic_load
from . import outputs
from .common import UsageError, nonneg_int, one_line, positive_int, rank_list

__all__ = ["add_parser", "DEEPSEEK_V3_EXPERT_BYTES", "BUILTIN_EXAMPLE"]

#: Bytes of one DeepSeek-V3 routed expert in fp8: gate, up and down projections of 7168 x 2048.
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048

#: The placement planned when neither ``--load`` nor ``--synthetic`` is given (any option overrides a field).
BUILTIN_EXAMPLE: Dict[str, Any] = dict(
    synthetic="lognormal1", layers=58, experts=256, seed=0,
    ranks=32, slots_per_rank=9, ranks_per_node=8, dead=[5, 17], current="healthy",
)

#: Defaults of ``--synthetic``.
SYNTHETIC_DEFAULTS: Dict[str, Any] = dict(layers=58, experts=256, seed=0)
DEFAULT_RANKS = 32


def _fraction(text: str) -> float:
    """argparse type of ``--min-balance``: a number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def add_parser(sub: Any) -> None:
    """Register ``plan`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "plan",
        help="plan an expert placement for a load on the live ranks",
        description=(
            "Plan an expert placement for a recorded or synthetic load on the live ranks and report "
            "balancedness, expert movement and orphans. With neither --load nor --synthetic, plans the "
            "built-in example: a DeepSeek-V3-sized load (synthetic lognormal1, 58 layers x 256 experts) on "
            "32 ranks x 9 slots, 8 ranks per node, ranks 5 and 17 dead, starting from a healthy placement."
        ),
    )
    src = p.add_argument_group("input (at most one; none = the built-in example)")
    ex = src.add_mutually_exclusive_group()
    ex.add_argument("--load", metavar="FILE",
                    help="expert load: SGLang expert-distribution recording (.pt), numpy matrix (.npy) or "
                         ".json; [layers, experts] or [steps, layers, experts] tokens")
    ex.add_argument("--synthetic", metavar="NAME", choices=sorted(SYNTHETIC_LOADS),
                    help=f"synthetic load family: {', '.join(sorted(SYNTHETIC_LOADS))}")
    src.add_argument("--layers", type=positive_int,
                     help=f"--synthetic: MoE layers (default {SYNTHETIC_DEFAULTS['layers']})")
    src.add_argument("--experts", type=positive_int,
                     help=f"--synthetic: logical experts per layer (default {SYNTHETIC_DEFAULTS['experts']})")
    src.add_argument("--seed", type=nonneg_int, help=f"--synthetic: random seed (default {SYNTHETIC_DEFAULTS['seed']})")

    topo = p.add_argument_group("cluster")
    topo.add_argument("--ranks", type=positive_int,
                      help=f"EP size, dead ranks included (default {DEFAULT_RANKS})")
    topo.add_argument("--slots-per-rank", type=positive_int,
                      help="physical expert slots per rank and layer (default: from --current FILE, else "
                           "ceil(1.125 x experts / ranks), i.e. 12.5%% redundant slots)")
    topo.add_argument("--ranks-per-node", type=positive_int,
                      help="ranks per node, for node-aware placement (must divide --ranks; default: no nodes)")
    topo.add_argument("--dead", type=rank_list, metavar="R1,R2,...",
                      help="dead ranks, comma-separated (default: none)")
    topo.add_argument("--current", metavar="FILE|healthy",
                      help="placement in force now (SGLang --init-expert-location .json/.pt, all its ranks "
                           "live), or 'healthy' to plan one on all ranks first; movement and orphans are "
                           "measured against it (default: SGLang's trivial placement, and the algorithm "
                           "plans from scratch)")

    alg = p.add_argument_group("algorithm")
    alg.add_argument("--algorithm", default="elasticity_aware", choices=sorted(ALGORITHMS),
                     help="EPLB algorithm (default elasticity_aware)")
    alg.add_argument("--min-balance", type=_fraction, metavar="FRAC",
                     help="elasticity_aware with --current: the trade-off, as at least this fraction of the "
                          "balancedness a from-scratch plan reaches, with the least movement (default: 0.99 "
                          "after a failure or scale event, 1.0 otherwise)")
    alg.add_argument("--balance-tolerance", type=float, metavar="FLOAT",
                     help="elasticity_aware: the same trade-off as how much busier (relative) a layer's busiest "
                          "rank may be than in a from-scratch plan (min balance = 1 / (1 + tolerance)); give "
                          "this or --min-balance")
    alg.add_argument("--balance-reference", choices=("greedy", "bound"),
                     help="elasticity_aware with --current: what --min-balance is a fraction of: the balance "
                          "of DeepSeek's greedy from-scratch plan, i.e. upstream's (greedy), or a lower "
                          "bound of any plan's busiest rank (bound: our from-scratch balance, more movement "
                          "on skewed loads); default greedy after a failure or scale event, bound otherwise")
    alg.add_argument("--search", choices=("narrow", "wide", "both"),
                     help="elasticity_aware with --current: where each swap looks for a partner: the 6 least "
                          "busy ranks (narrow), every rank under the target (wide: up to 22 %% fewer transfers "
                          "after a failure on skewed loads, ~1.7x the planning time), or narrow and then wide "
                          "for the layers whose narrow swaps fetched more than 24 experts (both; on a small problem "
                          "or <= 19 live ranks, narrow again with looser replica counts); default both "
                          "after a failure or scale event, narrow otherwise")
    alg.add_argument("--num-groups", type=positive_int,
                     help="deepseek: expert groups, for hierarchical (node-limited) placement")
    alg.add_argument("--expert-bytes", type=nonneg_int, default=DEEPSEEK_V3_EXPERT_BYTES,
                     help=f"bytes of one expert's weights, for movement in bytes "
                          f"(default {DEEPSEEK_V3_EXPERT_BYTES} = 3 x 7168 x 2048 fp8, DeepSeek-V3)")

    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE",
                     help="write the placement for SGLang's --init-expert-location (.json or .pt)")
    out.add_argument("--plot", metavar="FILE.png",
                     help="plot per-rank load (summed over layers) before and after (needs matplotlib; "
                          "no suffix: .png is added)")
    out.add_argument("--json", metavar="FILE",
                     help="write the report as JSON ('-': standard output, and the table goes to stderr)")
    p.set_defaults(func=_run_plan, parser=p)


# ----------------------------------------------------------------------------- plan
@dataclass
class _Setup:
    load: np.ndarray
    load_desc: str
    ranks: int
    slots_per_rank: int
    ranks_per_node: Optional[int]
    dead: List[int]
    current: Optional[str]
    current_placement: Optional[Placement]  # from a file (validated), else None
    builtin: bool
    outputs: List[outputs.Output]


def _resolve(args: argparse.Namespace) -> _Setup:
    """Fill defaults, read the inputs and check that they fit together (raises ``ValueError``)."""
    builtin = args.load is None and args.synthetic is None
    if args.load is not None or builtin:
        given = [f"--{n}" for n in ("layers", "experts", "seed") if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{'/'.join(given)} only go with --synthetic")
    if args.output is not None and Path(args.output).suffix not in (".json", ".pt"):
        raise UsageError(f"--output must end in .json or .pt, got {args.output!r}")
    fn = ALGORITHMS[args.algorithm]
    params = inspect.signature(fn).parameters
    if args.min_balance is not None and args.balance_tolerance is not None:
        raise UsageError("give --min-balance or --balance-tolerance, not both")
    for flag, name in (("--min-balance", "min_balance"), ("--balance-tolerance", "balance_tolerance"),
                       ("--search", "search"), ("--balance-reference", "balance_reference"),
                       ("--num-groups", "num_groups")):
        if getattr(args, name) is not None and name not in params:
            raise UsageError(f"{flag} is not an option of the {args.algorithm} algorithm")

    defaults = BUILTIN_EXAMPLE if builtin else dict(ranks=DEFAULT_RANKS, ranks_per_node=None, dead=[], current=None)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)  # noqa: E731

    outs = _outputs(args)
    outputs.check(outs)
    if args.load is not None:
        load: Optional[np.ndarray] = load_expert_load(args.load)
        load_desc = f"{args.load}"
        L, E = load.shape
    else:  # generated after the size check
        src = BUILTIN_EXAMPLE if builtin else SYNTHETIC_DEFAULTS
        name = BUILTIN_EXAMPLE["synthetic"] if builtin else args.synthetic
        L, E, seed = (args.layers or src["layers"], args.experts or src["experts"],
                      args.seed if args.seed is not None else src["seed"])
        load = None
        load_desc = f"synthetic {name} (seed {seed})"

    R = pick("ranks")
    rpn = pick("ranks_per_node")
    if rpn is not None and R % rpn:
        raise UsageError(f"--ranks-per-node ({rpn}) must divide --ranks ({R})")
    dead = pick("dead")
    bad = [r for r in dead if not 0 <= r < R]
    if bad:
        raise UsageError(f"dead rank {bad[0]} is out of range: ranks are 0..{R - 1}")
    current = pick("current")

    current_placement = None
    S = args.slots_per_rank if args.slots_per_rank is not None else (
        BUILTIN_EXAMPLE["slots_per_rank"] if builtin and args.ranks is None else None)
    if current is not None and current != "healthy":
        current_placement = _read_placement(current, R)
        cp = current_placement
        if cp.num_layers != L or (S is not None and cp.num_physical != R * S):
            want = f"[{L}, {R * S}]" if S is not None else f"[{L}, ranks x slots]"
            raise UsageError(f"--current {current}: placement has shape {list(cp.phy2log.shape)}, expected {want} "
                             f"(layers, ranks x slots per rank)")
        if cp.num_logical_experts > E:
            raise UsageError(f"--current {current}: placement names expert {cp.num_logical_experts - 1}, "
                             f"but the load has {E} experts")
        cp = Placement(cp.phy2log, R, E)
        try:
            cp.validate(allow_duplicates=True)
        except PlacementError as exc:
            raise UsageError(f"--current {current}: {exc}") from None
        current_placement = cp
        S = cp.slots_per_rank
    if S is None:
        S = min(math.ceil(E * 9 / (8 * R)), E)
    if R * S < E:
        raise UsageError(f"{R} ranks x {S} slots = {R * S} slots cannot hold {E} logical experts")
    _check_memory(args, L, E, R, S)
    if load is None:
        load = synthetic_load(name, L, E, seed=seed)
    return _Setup(load, load_desc, R, S, rpn, dead, current, current_placement, builtin, outs)


def _outputs(args: argparse.Namespace) -> List[outputs.Output]:
    """The run's output files (``--plot`` without a suffix gets ``.png``, as matplotlib writes it)."""
    outs = []
    if args.output is not None:
        outs.append(outputs.Output("--output", args.output, args.output))
    if args.json is not None:
        outs.append(outputs.Output("--json", args.json, args.json, stdout_ok=True))
    if args.plot is not None:
        real = args.plot if Path(args.plot).suffix else args.plot + ".png"
        _check_plot_format(args.plot, real)
        outs.append(outputs.Output("--plot", args.plot, real))
    return outs


def _check_plot_format(given: str, real: str) -> None:
    """matplotlib present and able to write ``real``'s format (checked before any work)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sglang-elastic[plot]'") from None
    fmt = Path(real).suffix[1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(f"--plot {given}: format {fmt!r} is not supported; use one of {', '.join(sorted(supported))}")


#: Bytes planning takes per (layer, expert) and per (layer, expert, slot per rank), measured with the
#: built-in algorithms at 4 096 and 16 384 experts (58 layers, 32 ranks), with a 2x margin.
_BYTES_PER_LAYER_EXPERT = 512
_BYTES_PER_LAYER_EXPERT_SLOT = 2


def planning_memory_bytes(layers: int, experts: int, ranks: int, slots_per_rank: int) -> int:
    """Estimated peak memory to plan ``layers x experts`` on ``ranks x slots_per_rank`` (bytes)."""
    return (layers * experts * (_BYTES_PER_LAYER_EXPERT + _BYTES_PER_LAYER_EXPERT_SLOT * slots_per_rank)
            + 8 * 4 * layers * ranks * slots_per_rank)


def _available_memory() -> Optional[int]:
    """Memory available to a new allocation (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # not Linux: no up-front check
        return None
    return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def _check_memory(args: argparse.Namespace, L: int, E: int, R: int, S: int) -> None:
    """Refuse a plan that would not fit in memory, saying how much it would need."""
    need = planning_memory_bytes(L, E, R, S)
    have = _available_memory()
    if have is not None and need > have:
        raise UsageError(f"planning {L} layers x {E} experts on {R} ranks x {S} slots needs about {_gb(need)} of "
                         f"memory, {_gb(have)} is available; use fewer --experts/--layers or more --ranks")


def _read_placement(path: str, num_ranks: int) -> Placement:
    """``--current FILE``: an SGLang ``--init-expert-location`` file (.json/.pt), read safely."""
    if Path(path).suffix not in (".json", ".pt"):
        raise UsageError(f"--current {path}: placement files must end in .json or .pt")
    try:
        data = read_data_file(path, (".json", ".pt"), what="placement")
    except ValueError as exc:
        raise UsageError(f"--current: cannot read placement file {exc}") from None
    if not isinstance(data, dict) or "physical_to_logical_map" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"--current {path}: expected a 'physical_to_logical_map' entry, found {keys}")
    try:
        p2l = torch.as_tensor(np.asarray(data["physical_to_logical_map"], dtype=np.int64))
    except (ValueError, TypeError, OverflowError) as exc:
        raise UsageError(f"--current {path}: physical_to_logical_map is not a rectangular integer array "
                         f"({one_line(exc)})") from None
    try:
        return Placement.from_sglang(p2l, num_ranks, None, None)
    except PlacementError as exc:
        raise UsageError(f"--current {path}: {exc}") from None


def _mask_ranks(placement: Placement, live: np.ndarray) -> Placement:
    """``placement`` with every slot of a rank not in ``live`` set to -1 (the routing mask after a failure)."""
    p = placement.by_rank().clone()
    p[:, torch.from_numpy(~live)] = -1
    return Placement(p.reshape(placement.num_layers, -1), placement.num_ranks, placement.num_logical_experts)


def _fmt_ranks(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if len(ranks) <= 1:
        return "".join(map(str, ranks))
    return ", ".join(map(str, ranks[:-1])) + " and " + str(ranks[-1])


def _plot(path: str, load: np.ndarray, before: Placement, before_title: str, after: Placement,
          dead: List[int]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sglang-elastic[plot]'") from None
    R = before.num_ranks
    panels = [(before_title, before), ("after: planned placement", after)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.3 * R + 2), 6.5), sharex=True, sharey=True)
    x = np.arange(R)
    for ax, (title, pl) in zip(axes, panels):
        tok = rank_load(load, pl)
        live = pl.live_ranks.numpy()
        per_rank = np.where(live, np.nansum(np.nan_to_num(tok, nan=0.0), axis=0), 0.0)
        ax.bar(x[live], per_rank[live], color="tab:blue", width=0.8, label="live rank")
        mean = per_rank[live].mean() if live.any() else 0.0
        peak = float(np.nanmax(tok, axis=1).sum()) if live.any() else 0.0
        ax.axhline(mean, color="black", lw=0.8, ls="--", label="mean live rank")
        # Balancedness is mean / this line: each layer waits for its busiest rank.
        ax.axhline(peak, color="tab:orange", lw=1.0, ls=":", label="sum over layers of the busiest rank")
        if dead:
            ax.scatter(dead, np.zeros(len(dead)), marker="x", color="tab:red", s=60, zorder=3, clip_on=False,
                       label="dead rank")
        bal = balancedness(load, pl)
        ax.set_title(f"{title} (balancedness {bal:.4f})", fontsize=10)
        ax.set_ylabel("tokens (sum over layers)")
    top = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(0, top * 1.18)
        ax.legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1].set_xlabel("rank")
    axes[-1].set_xticks(x if R <= 64 else x[:: max(1, R // 32)])
    for t in axes[-1].get_xticklabels():
        if int(float(t.get_text() or -1)) in dead:
            t.set_color("tab:red")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)  # OSError: the caller names --plot
    except ValueError as exc:
        raise UsageError(f"--plot: {one_line(exc)}") from None
    finally:
        plt.close(fig)


def _run_plan(args: argparse.Namespace) -> int:
    st = _resolve(args)
    w, R, S, rpn, dead = st.load, st.ranks, st.slots_per_rank, st.ranks_per_node, st.dead
    L, E = w.shape
    live = np.ones(R, dtype=bool)
    live[dead] = False
    options: Dict[str, Any] = {}
    if args.min_balance is not None:
        options["min_balance"] = args.min_balance
    if args.balance_tolerance is not None:
        options["balance_tolerance"] = args.balance_tolerance
    if args.search is not None:
        options["search"] = args.search
    if args.balance_reference is not None:
        options["balance_reference"] = args.balance_reference
    if args.num_groups is not None:
        options["num_groups"] = args.num_groups

    if st.builtin:
        print(f"No --load or --synthetic given: planning the built-in example ({st.load_desc}, {L} layers x {E} "
              f"experts, {R} ranks x {S} slots"
              + (f", {rpn} ranks per node" if rpn else "")
              + (f", rank{'s' if len(dead) > 1 else ''} {_fmt_ranks(dead)} dead" if dead else "")
              + (", current = a healthy placement" if st.current == "healthy" else "") + ").",
              file=sys.stderr if args.json == outputs.STDOUT else sys.stdout)

    # The placement in force before the failure, and the label the report gives it.
    if st.current == "healthy":
        # The healthy placement is a from-scratch one: the movement/balance trade-off does not apply.
        algo_opts = {k: v for k, v in options.items()
                     if k not in ("balance_tolerance", "min_balance", "search", "balance_reference")}
        before = rebalance(w, R, S, ranks_per_node=rpn, algorithm=args.algorithm, **algo_opts)
        before_desc = f"healthy {args.algorithm} placement of the same load on all {R} ranks"
        current_arg: Optional[Placement] = before
    elif st.current_placement is not None:
        before = st.current_placement
        before_desc = f"{st.current}"
        current_arg = before
    else:
        before = Placement.trivial(L, E, R, S)
        before_desc = "SGLang's trivial placement (no --current; the plan is made from scratch)"
        current_arg = None

    t0 = time.perf_counter()
    after = rebalance(w, R, S, live_ranks=live, ranks_per_node=rpn, current=current_arg,
                      algorithm=args.algorithm, **options)
    elapsed_ms = (time.perf_counter() - t0) * 1e3

    newly_dead = before.live_ranks.numpy() & ~live
    orphan_mask = orphans(before, live).numpy()
    n_orphans = int(orphan_mask.sum())
    orphan_layers = int(orphan_mask.any(1).sum())
    masked = _mask_ranks(before, live) if newly_dead.any() else None
    bal_before = balancedness(w, before)
    lbal_before = float(layer_balancedness(w, before).mean())
    bal_masked = balancedness(w, masked) if masked is not None else None
    bal_after = balancedness(w, after)
    lbal_after = float(layer_balancedness(w, after).mean())
    moved = movement(before, after)
    moved_bytes = moved * args.expert_bytes
    live_both = int((before.live_ranks & after.live_ranks).sum())
    moved_frac = moved / max(1, L * live_both * S)

    report: Dict[str, Any] = dict(
        load=st.load_desc, layers=L, experts=E, tokens=float(w.sum()),
        ranks=R, slots_per_rank=S, ranks_per_node=rpn, dead_ranks=dead, live_ranks=int(live.sum()),
        algorithm=args.algorithm, options=options, current=st.current if st.current is not None else "trivial",
        balancedness_before=bal_before, layer_balancedness_before_mean=lbal_before,
        balancedness_masked=bal_masked,
        balancedness_after=bal_after, layer_balancedness_after_mean=lbal_after,
        movement_slots=moved, movement_fraction=moved_frac, expert_bytes=args.expert_bytes,
        movement_bytes=moved_bytes, orphans=n_orphans, orphan_layers=orphan_layers,
        rebalance_ms=elapsed_ms, output=args.output,
    )

    opt_text = ", ".join(f"{k}={v}" for k, v in options.items())
    nodes = f", {rpn} ranks per node ({R // rpn} nodes)" if rpn else ""
    lines = [
        ("load", f"{st.load_desc}: {L} layers x {E} experts, {w.sum():.4g} tokens"),
        ("ranks", f"{R} x {S} slots ({R * S} physical slots per layer){nodes}"),
        ("live ranks", f"{int(live.sum())} of {R}" + (f" (dead: {', '.join(map(str, dead))})" if dead else "")),
        ("algorithm", args.algorithm + (f" ({opt_text})" if opt_text else "")),
        ("current", before_desc),
        ("balancedness", f"before {bal_before:.4f} (mean per layer {lbal_before:.4f}), the current placement "
                         f"on its own live ranks"),
    ]
    if bal_masked is not None:
        lines.append(("", f"masked {bal_masked:.4f}, the current placement with the dead ranks masked out"
                          + (" (orphans' tokens left out)" if n_orphans else "")))
    lines += [
        ("", f"after  {bal_after:.4f} (mean per layer {lbal_after:.4f}), the planned placement"),
        ("movement", f"{moved} slots ({100 * moved_frac:.2f} % of live slots), {moved_bytes / 1e9:.2f} GB "
                     f"at {args.expert_bytes} bytes per expert"),
        ("orphans", f"{n_orphans} (layer, expert) pairs" + (f" in {orphan_layers} layers" if n_orphans else "")
                    + " have no live replica in the current placement"),
        ("time", f"rebalance {elapsed_ms:.1f} ms"),
    ]
    by_flag = {o.flag: o for o in st.outputs}
    with outputs.AtomicWrites() as files:
        if "--output" in by_flag:
            files.write(by_flag["--output"], lambda tmp: save_placement_file(after, tmp))
            lines.append(("output", f"{args.output} (for SGLang: --init-expert-location {args.output})"))
        if "--plot" in by_flag:
            title = ("before: current placement, dead ranks masked" if masked is not None
                     else "before: current placement")
            files.write(by_flag["--plot"], lambda tmp: _plot(tmp, w, masked if masked is not None else before,
                                                              title, after, dead))
            lines.append(("plot", by_flag["--plot"].real))
        report_json = outputs.strict_json(report) if "--json" in by_flag else None
        if "--json" in by_flag and not by_flag["--json"].to_stdout:
            files.write(by_flag["--json"], lambda tmp: Path(tmp).write_text(report_json))
            lines.append(("json", args.json))
        files.commit()
    table = "\n".join(f"  {k:<14}{v}" for k, v in lines)
    if report_json is not None and by_flag["--json"].to_stdout:
        print(table, file=sys.stderr)  # standard output carries the JSON alone, for pipes
        outputs.print_stdout(report_json)
        return 0
    print(table)
    return 0

"""Healthy (from-scratch) balance, ours against upstream SGLang's EPLB, over load seeds.

Target (3) of issue 16 on loads the bench's default run does not have: for each shape, synthetic load
family and seed, ours (``elasticity_aware`` from scratch) and upstream SGLang 0.5.23's
``elasticity_aware`` (its code, in the same run) place the same load on all ranks; prints the cells
where ours is less balanced and a summary line per shape. Balance only (no timings).

    python bench/eplb_healthy_seeds.py --seeds 4
    python bench/eplb_healthy_seeds.py --seeds 4 --shapes ds3-ep32,kimi-ep48
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_eplb as B  # noqa: E402

from sglang_elastic.eplb.synthetic import SYNTHETIC_LOADS  # noqa: E402

DEFAULT_SHAPES = "ds3-ep32,kimi-ep48,qwen3-ep16,qwen3-ep16x10"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="load seeds 0..N-1 (default 4)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"bench shape keys (default {DEFAULT_SHAPES})")
    args = ap.parse_args(argv)
    ours = next(a for a in B.ALGOS if a.name == B.OURS_EA)
    up = next(a for a in B.ALGOS if a.name == B.UP_EA)
    total = below = 0
    for key in args.shapes.split(","):
        shape = B.SHAPES[key]
        sc = B.scenario(shape, "healthy")
        n_shape = n_below = 0
        for family in sorted(SYNTHETIC_LOADS):
            for seed in range(args.seeds):
                bench = B.Bench(repeats=1, seed=seed, verbose=False)
                load = bench.load(shape, family)
                o = bench.run_one(ours, shape, family, sc, load)
                u = bench.run_one(up, shape, family, sc, load)
                n_shape += 1
                if o.balancedness < u.balancedness:
                    n_below += 1
                    print(f"  below: {shape.name} {family} seed {seed}: ours {o.balancedness:.6f} "
                          f"upstream {u.balancedness:.6f} ({100 * (o.balancedness / u.balancedness - 1):+.4f} %)")
        print(f"{shape.name}: ours below upstream in {n_below} of {n_shape} healthy placements")
        total, below = total + n_shape, below + n_below
    print(f"all: ours below upstream in {below} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

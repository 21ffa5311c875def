"""Expert-parallel load balancing: placements, algorithms and metrics (pure tensor code)."""
from .algorithms import ALGORITHMS, rebalance, register_algorithm
from .algorithms.refine_jit import warm_up, warm_up_in_background
from .metrics import balancedness, layer_balancedness, movement, movement_bytes, orphans, rank_load
from .placement import Placement, PlacementError, load_placement_file, save_placement_file

__all__ = [
    "ALGORITHMS",
    "Placement",
    "PlacementError",
    "balancedness",
    "layer_balancedness",
    "load_placement_file",
    "movement",
    "movement_bytes",
    "orphans",
    "rank_load",
    "rebalance",
    "register_algorithm",
    "save_placement_file",
    "warm_up",
    "warm_up_in_background",
]

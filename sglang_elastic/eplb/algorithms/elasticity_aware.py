"""placeholder, being written"""
from . import register_algorithm


@register_algorithm("elasticity_aware")
def _todo(weight, num_ranks, slots_per_rank, live, ranks_per_node, current, **options):
    raise NotImplementedError("elasticity_aware")

"""placeholder, being written"""
from . import register_algorithm


@register_algorithm("deepseek")
def _todo(weight, num_ranks, slots_per_rank, live, ranks_per_node, current, **options):
    raise NotImplementedError("deepseek")

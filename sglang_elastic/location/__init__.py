"""Moving expert weights when the placement changes: transfer planning, backup store, updater."""
from .plan import TransferPlan, plan_transfers

__all__ = ["TransferPlan", "plan_transfers"]

"""Context parallelism: attention over a sequence sharded across torch.distributed ranks, with
the communication plan derived from the pattern's schedule (see `plan`, `layout`, `cp`)."""
from .layout import BALANCES, Layout
from .plan import Plan, PlanError, RankPlan, make_plan

__all__ = ["ContextParallel", "Plan", "RankPlan", "PlanError", "Layout", "BALANCES", "make_plan"]


def __getattr__(name):
    if name == "ContextParallel":
        from .cp import ContextParallel
        return ContextParallel
    raise AttributeError(name)

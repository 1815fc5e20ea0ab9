"""Per-agent rate limits (GCRA on agent and agent×tool keys) and cost budgets.

``table`` compiles the limits data and resolves one call's limits; ``gcra`` and
``budgets`` hold the algorithms and the in-process stores; ``redis_store`` shares
them across replicas; ``store`` decides what happens when Redis fails. A limit is
one window (``Rate``, ``Budget``) or several checked at once (``Windows``,
``BudgetWindows``), enforced or in warn mode (reported, never refused).
"""

from .budgets import Budget, BudgetVerdict, BudgetWindows, MemoryBudgets, parse_duration
from .gcra import KeyResult, MemoryRateLimiter, Rate, RateDecision, Windows, gcra
from .store import (
    FAIL_CLOSED, FAIL_OPEN, FALLBACK_LOCAL, RECOVERED, STORE_ERROR, LimitStores, StoreHealth,
    open_limit_stores,
)
from .table import EffectiveLimits, LimitsError, LimitsTable, compile_limits, resolve_limits

__all__ = [
    "Budget", "BudgetVerdict", "BudgetWindows", "Windows", "EffectiveLimits", "KeyResult", "LimitStores", "LimitsError",
    "LimitsTable", "MemoryBudgets", "MemoryRateLimiter", "Rate", "RateDecision", "StoreHealth",
    "compile_limits", "gcra", "open_limit_stores", "parse_duration", "resolve_limits",
    "STORE_ERROR", "FALLBACK_LOCAL", "FAIL_OPEN", "FAIL_CLOSED", "RECOVERED",
]

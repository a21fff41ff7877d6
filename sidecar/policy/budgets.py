"""Budget arithmetic: costs, periods and what a shortfall still allows (pure).

Costs are integers: tokens, or billionths of the currency unit (prices are per 1k tokens),
rounded up, so a sum in Redis never drifts and never undercharges.
"""

from __future__ import annotations

import functools
import time

from sidecar.policy.schema import MONEY, Budget, Price

DAY_S = 86_400


def cost(
    budget: Budget, price: Price, prompt: int, generation: int, cached: tuple[int, int] | None = None
) -> int:
    """``cached``: the input tokens among ``prompt`` read from and written to a prompt cache;
    None when not known yet (a reservation): the prompt is then priced at the dearest of the
    three input prices, so a reservation never falls short for the split the answer says."""
    if budget.unit != MONEY:
        return prompt + generation
    fresh, read, write = price.input_prices
    if cached is None:
        inputs = prompt * max(fresh, read, write)
    else:
        hit, made = cached
        inputs = (prompt - hit - made) * fresh + hit * read + made * write
    return -(-(inputs + generation * price.generation) // 1000)


def periods(now: float) -> tuple[str, str]:
    """The UTC day (``20250131``) and month (``202501``) a moment belongs to."""
    return _periods_of_day(int(now // DAY_S))


@functools.lru_cache(maxsize=4)
def _periods_of_day(day_number: int) -> tuple[str, str]:
    day = time.strftime("%Y%m%d", time.gmtime(day_number * DAY_S))
    return day, day[:6]


def generation_allowed(budget: Budget, price: Price, granted: int, prompt: int, n: int) -> int:
    """Generated tokens per choice that ``granted`` still pays for after the prompt."""
    left = granted - cost(budget, price, prompt, 0)
    if left <= 0:
        return 0
    per_token = 1 if budget.unit != MONEY else price.generation / 1000
    if per_token <= 0:
        return 2**31
    return int(left // per_token) // max(1, n)


def used_ratio(budget: Budget, day_used: int, month_used: int) -> float:
    ratios = [0.0]
    if budget.daily:
        ratios.append(day_used / budget.daily)
    if budget.monthly:
        ratios.append(month_used / budget.monthly)
    return max(ratios)

"""Capped exponential backoff with jitter."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before attempt number ``attempt`` (1-based): full jitter, capped.

    The upper bound doubles with every attempt (``base``, ``2*base``, ...) up to ``cap``; the delay
    is drawn between half the bound and the bound so that relays do not retry in lockstep.
    """
    bound = min(cap, base * (2 ** max(0, attempt - 1)))
    return random.uniform(bound / 2, bound)

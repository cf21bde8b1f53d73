"""Stage 2, the search: indicators, the exact solver, evolution, the Ray scorer pool.

One module per concern; ``stage.run_search`` is the entry point that ties them
together (``pipeline.run`` imports it from here). Budgets live in ``pipeline.budgets``,
shared with stage 1, which checks them before it trains.

- ``indicators``: how an architecture is scored (``bn``, ``acc``; ``@register_indicator``)
- ``exact``: the constrained optimum of an additive indicator (branch and bound)
- ``evolution``: the paper's evolutionary search, seeded
- ``pool``: scoring on Ray actors, robust to an actor dying
- ``stage``: ``run_search`` and the files it reads and writes
"""

from .evolution import NoCandidatesError, Record, Sampler, evolve
from .exact import exact_search
from .indicators import INDICATORS, AccIndicator, BNIndicator, Indicator, get_indicator, register_indicator, take_batches
from .pool import ScorerActor, ScorerPool, SearchHooks
from .stage import CACHE_FILE, RESULT_FILE, SCORED_FILE, TOPN_FILE, checked_space, run_search

__all__ = [
    "AccIndicator", "BNIndicator", "CACHE_FILE", "INDICATORS", "Indicator", "NoCandidatesError", "RESULT_FILE",
    "Record", "SCORED_FILE", "Sampler", "ScorerActor", "ScorerPool", "SearchHooks", "TOPN_FILE", "checked_space",
    "evolve", "exact_search", "get_indicator", "register_indicator", "run_search", "take_batches",
]

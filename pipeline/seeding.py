"""The one seed scheme: every random stream derives from (seed, purpose...).

``derive_seed(seed, "loader", epoch)`` is an independent 63-bit seed per purpose, made
by numpy's ``SeedSequence`` with the purpose as its spawn key (what
``SeedSequence.spawn`` itself does for child streams). Separate streams keep choices
independent: changing ``data.fraction`` must not move the validation split, and seed 1
/ epoch 0 must not replay seed 0 / epoch 1 (as ``seed + epoch`` would). A stream
derived from the seed rather than carried along is also what lets a resumed epoch draw
exactly what the uninterrupted run drew.

Only numpy is imported here (torch on first use), so data.py and the search code import
this without cost.
"""

from __future__ import annotations

import random
import zlib

import numpy as np


def _word(part: object) -> int:
    # Strings by a hash that is the same in every process (Python's hash() is salted).
    if isinstance(part, str):
        return zlib.crc32(part.encode("utf-8"))
    value = int(part)
    if value < 0:
        raise ValueError(f"seed purposes must be strings or non-negative integers, got {part!r}")
    return value


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for ``purpose`` (strings and non-negative ints) under ``seed``."""
    sequence = np.random.SeedSequence(int(seed), spawn_key=tuple(_word(p) for p in purpose))
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def torch_generator(seed: int, *purpose: object):
    """A ``torch.Generator`` seeded with ``derive_seed(seed, *purpose)``."""
    import torch

    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *purpose))
    return g


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators, for code that draws from them
    (module initialisation); streams of our own come from ``derive_seed``."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

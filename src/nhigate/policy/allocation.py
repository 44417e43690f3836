"""Allocation-heavy phases (document decode/encode, index compilation) without GC pauses.

Building a 10k-grant document allocates a few hundred thousand containers; the
cyclic garbage collector would re-scan the growing heap again and again while
nothing it could free exists yet. Pausing it for the duration of one build
roughly halves the time; it is re-enabled (if it was enabled) on the way out.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic GC for the block; restore the previous state afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

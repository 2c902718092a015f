"""What llmscale sets in its own process's environment before torch allocates, and the
environment without it, for processes that are not llmscale (the peers benchmarks start).

- `THP_MEM_ALLOC_ENABLE=1`: torch's CPU allocator aligns allocations of 2 MiB and more to 2 MiB
  and asks the kernel for transparent huge pages there (c10 reads it at its first large
  allocation). A decode step reads the whole KV cache of its batch and all the weights: on 4 KiB
  pages that is a TLB miss every 4 KiB, and a KV block list scattered over the cache pays one
  more per block (BENCHMARKS.md, "Huge pages"). A value the user set stands.
"""

from __future__ import annotations

import os

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
_own: dict[str, str] = {}  # what this module set, not the user


def apply() -> None:
    if HUGE_PAGES not in os.environ:
        os.environ[HUGE_PAGES] = _own[HUGE_PAGES] = "1"


def peer_environ() -> dict[str, str]:
    """This process's environment as the user gave it: a peer runs with its own defaults."""
    return {k: v for k, v in os.environ.items() if k not in _own}

"""Placement policies by name: which rows of a table a faster tier keeps (see policy.py).

Policies (`make_policy(name, capacity)`), a file per family:
- "engram" (`EngramPolicy`, engram.py, the default): frequencies from a count-min sketch of bounded size,
  halved periodically so old popularity fades; TinyLFU-style admission (a row comes in only if it
  ranks above the row it would displace) and the look-ahead: rows of announced requests are kept
  and admitted first, nearest request first, since each is a hit that soon whatever its frequency.
- "lfu" (`LFUPolicy`, simple.py): exact read counts since the start, the C most-read rows kept.
- "lru" (`LRUPolicy`, simple.py): every read row comes in, the least recently read rows go out.
- "random" (`RandomPolicy`, simple.py): every read row comes in, random resident rows go out (seeded).
- "recent" (`RecentPolicy`, recent.py): the most recently read rows, in memory bounded by the
  tier's capacity (a cold shard's DRAM budget), not by the table's size.

The base class `Policy` and the plan the policies share are in policy.py, the engram policy's
count-min sketch and look-ahead in sketch.py and lookahead.py; replay.py replays a trace against a
policy and against Belady's MIN.
"""
from __future__ import annotations

from memory_service.placement.engram import EngramPolicy
from memory_service.placement.policy import Policy
from memory_service.placement.recent import RecentPolicy
from memory_service.placement.simple import LFUPolicy, LRUPolicy, RandomPolicy

POLICIES = {"engram": EngramPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "random": RandomPolicy}
# Policies whose memory is bounded by the tier's capacity, for placement under a DRAM budget.
BOUNDED_POLICIES = {"recent": RecentPolicy}
DEFAULT_POLICY = "engram"

__all__ = ["BOUNDED_POLICIES", "DEFAULT_POLICY", "POLICIES", "EngramPolicy", "LFUPolicy", "LRUPolicy",
           "Policy", "RandomPolicy", "RecentPolicy", "make_policy"]


def make_policy(name: str, capacity: int, **kw) -> Policy:
    """The policy called `name` (one of POLICIES) for a tier of `capacity` rows; `kw` go to its
    constructor (e.g. seed for "random", decay_period for "engram")."""
    known = {**POLICIES, **BOUNDED_POLICIES}
    if name not in known:
        raise ValueError(f"unknown placement policy {name!r}; known: {sorted(known)}")
    return known[name](capacity, **kw)

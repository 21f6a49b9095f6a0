"""Quotas: the most rows and bytes each namespace's tables may store, enforced before any change.

A namespace is a table name's part before its first "/" (config.namespace_of). Its quota
(`NamespaceQuota`) counts, over every table of the namespace in the whole cluster, the rows
stored (materialized: written at least once; rows never written are computed from the seed and
cost nothing) and their bytes in DRAM terms: 4 * (width + state_width) per row (float32 row and
optimizer state; the index, the tiers' copies and LMDB's pages are not counted, so the measure is
the same on every kind of shard).

Rows are spread over the cold shards by id (id % num_shards), so each cold shard enforces its
share of the quota: max // num_shards, one more on the first max % num_shards shards, the shares
summing to the quota exactly. A cold shard counts as its own the rows that moved away to a hot
shard (homes.Homes: the ids it is not home of now, written or not), so the hot shards, which
enforce nothing, hold only rows some cold shard already counts, and rows moving between shards
never take a namespace past its quota (a conservative count: a hot row never written counts too).
A change that would take a namespace's usage on this shard past its share is refused whole
(QuotaExceeded, gRPC RESOURCE_EXHAUSTED) before anything changes; a skewed table can thus be
refused on one shard before the cluster-wide total reaches the quota. A checkpoint restore is not
checked: it brings back what a cluster held, within the quota it had then.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from memory_service.config import namespace_of
from memory_service.errors import QuotaExceeded

FLOAT32_BYTES = 4


def bytes_per_row(width: int, state_width: int) -> int:
    """A stored row's bytes as quotas count them: its float32 values and optimizer state."""
    return FLOAT32_BYTES * (width + state_width)


@dataclass(frozen=True)
class NamespaceQuota:
    """Namespace `namespace`'s limits over the whole cluster: `max_rows` rows stored, `max_bytes`
    their bytes (bytes_per_row each); None: no limit of that kind."""

    namespace: str
    max_rows: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or "/" in self.namespace:
            raise ValueError(f"quota namespace {self.namespace!r} must be a string without '/' (a table "
                             f"name's part before its first '/'; '' is the default namespace)")
        for name in ("max_rows", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"quota of namespace {self.namespace!r}: {name} must be an int >= 0 or None, "
                                 f"got {value!r}")
        if self.max_rows is None and self.max_bytes is None:
            raise ValueError(f"quota of namespace {self.namespace!r} sets neither max_rows nor max_bytes")


def share(total: int | None, shard_id: int, num_shards: int) -> int | None:
    """Shard `shard_id`'s share of a cluster-wide limit `total` (None: no limit)."""
    if total is None:
        return None
    return total // num_shards + (1 if shard_id < total % num_shards else 0)


@dataclass(frozen=True)
class TableUse:
    """One table's use of its namespace's quota on a shard: rows counted (stored, and moved away
    from a cold shard) and the bytes of each."""

    name: str
    rows: int
    bytes_per_row: int


class Quotas:
    """Shard `shard_id` of `num_shards` cold shards' share of each namespace's quota."""

    def __init__(self, quotas: Iterable[NamespaceQuota], shard_id: int, num_shards: int) -> None:
        quotas = tuple(quotas)
        self.totals = {q.namespace: q for q in quotas}
        if len(self.totals) != len(quotas):
            raise ValueError(f"quotas name a namespace twice: {sorted(q.namespace for q in quotas)}")
        self.shares = {q.namespace: (share(q.max_rows, shard_id, num_shards), share(q.max_bytes, shard_id, num_shards))
                       for q in quotas}
        self.shard_id = shard_id

    def __bool__(self) -> bool:
        return bool(self.shares)

    def applies(self, name: str) -> bool:
        """Whether table `name`'s namespace has a quota."""
        return namespace_of(name) in self.shares

    def check_new_rows(self, new_rows: Mapping[str, int], uses: Iterable[TableUse]) -> None:
        """QuotaExceeded, naming the namespace, its quota and its usage, unless storing
        `new_rows` {table: rows it would materialize on this shard} keeps every namespace within
        its share here; `uses` is every table of this shard as it is now. Changes nothing."""
        uses = {use.name: use for use in uses}
        for namespace in {namespace_of(name) for name, count in new_rows.items() if count}:
            if namespace not in self.shares:
                continue
            mine = [use for use in uses.values() if namespace_of(use.name) == namespace]
            rows = sum(use.rows for use in mine)
            nbytes = sum(use.rows * use.bytes_per_row for use in mine)
            more = {name: count for name, count in new_rows.items() if namespace_of(name) == namespace}
            more_rows = sum(more.values())
            more_bytes = sum(count * uses[name].bytes_per_row for name, count in more.items())
            max_rows, max_bytes = self.shares[namespace]
            for what, used, adding, limit, total in (
                    ("rows", rows, more_rows, max_rows, self.totals[namespace].max_rows),
                    ("bytes", nbytes, more_bytes, max_bytes, self.totals[namespace].max_bytes)):
                if limit is not None and used + adding > limit:
                    raise QuotaExceeded(
                        f"{QuotaExceeded.PREFIX} namespace {namespace!r} is over its quota of {total} {what} (this shard's share "
                        f"{limit}): it uses {used} {what} on shard {self.shard_id}, and this request would "
                        f"store {adding} more; refused, nothing applied")

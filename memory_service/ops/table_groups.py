"""Stats per Engram layer, N-gram order and head: the cluster's tables grouped by their labels.

A model's tables carry labels (TableConfig.labels; the trainer sets layer, order and head), and
operators ask per group what no single table answers: how many rows a step takes from each
layer, how often those reads hit each storage tier or a hot shard, how crowded each order's hash
slots are. `TableGroup.of(tables, keys)` sums the tables whose labels agree on `keys` (and on the
namespace, the name's part before its first "/", when "namespace" is one of the keys).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memory_service.config import namespace_of
from memory_service.ops.reports import TableSummary

NAMESPACE = "namespace"  # a key that groups by the table name's namespace, not by a label


def group_key(table: TableSummary, keys: Sequence[str]) -> tuple[str, ...]:
    """The table's value of each key ("" where it has no such label)."""
    labels = dict(table.labels)
    return tuple(namespace_of(table.name) if key == NAMESPACE else labels.get(key, "") for key in keys)


@dataclass(frozen=True)
class TableGroup:
    """The tables whose labels agree on some keys, summed over their shards."""

    key: tuple[tuple[str, str], ...]  # (label, value) per grouping key
    tables: int
    rows: int  # rows stored (written)
    bytes: int
    rows_read: int
    hot_rows_read: int
    tier_hits: dict[str, int]  # tier -> row reads it served
    distinct_rows_per_read: float | None  # summed over the group's tables: rows a step takes
    collision_lookups: int  # lookups the collision stats recorded (tables that sample them)
    colliding_lookups: float  # of those, lookups of slots holding >= 2 distinct N-grams

    @property
    def computed(self) -> int:
        """Row reads of never-written rows (computed from the seed, no tier held them)."""
        return self.rows_read - sum(self.tier_hits.values())

    def hit_rate(self, tier: str) -> float | None:
        return self.tier_hits.get(tier, 0) / self.rows_read if self.rows_read else None

    @property
    def hot_hit_rate(self) -> float | None:
        """Share of the rows read that hot shards served."""
        return self.hot_rows_read / self.rows_read if self.rows_read else None

    @property
    def collision_share(self) -> float | None:
        """Share of lookups that landed in a slot holding >= 2 distinct N-grams (lookup-weighted
        over the group's tables with collision stats)."""
        return self.colliding_lookups / self.collision_lookups if self.collision_lookups else None

    @classmethod
    def of(cls, tables: Sequence[TableSummary], keys: Sequence[str]) -> list["TableGroup"]:
        """One group per distinct value of `keys` among `tables`, sorted by those values (numbers
        as numbers: layer 10 after layer 2)."""
        members: dict[tuple[str, ...], list[TableSummary]] = {}
        for table in tables:
            members.setdefault(group_key(table, keys), []).append(table)
        return [cls._sum(tuple(zip(keys, value)), members[value]) for value in sorted(members, key=_natural)]

    @classmethod
    def _sum(cls, key: tuple[tuple[str, str], ...], tables: list[TableSummary]) -> "TableGroup":
        hits: dict[str, int] = {}
        for table in tables:
            for tier, usage in table.tiers.items():
                hits[tier] = hits.get(tier, 0) + usage.hits
        per_read = [t.distinct_rows_per_read for t in tables if t.distinct_rows_per_read is not None]
        sampled = [t.collisions for t in tables if t.collisions is not None and t.collisions.collision_share is not None]
        return cls(key=key, tables=len(tables), rows=sum(t.rows for t in tables), bytes=sum(t.bytes for t in tables),
                   rows_read=sum(t.rows_read for t in tables), hot_rows_read=sum(t.hot_rows_read for t in tables),
                   tier_hits=hits, distinct_rows_per_read=sum(per_read) if per_read else None,
                   collision_lookups=sum(c.lookups for c in sampled),
                   colliding_lookups=sum(c.collision_share * c.lookups for c in sampled))

    def to_json(self) -> dict:
        return {"key": dict(self.key), "tables": self.tables, "rows": self.rows, "bytes": self.bytes,
                "rows_read": self.rows_read, "computed": self.computed, "tier_hits": self.tier_hits,
                "hit_rate": {tier: self.hit_rate(tier) for tier in self.tier_hits},
                "hot_rows_read": self.hot_rows_read, "hot_hit_rate": self.hot_hit_rate,
                "distinct_rows_per_read": self.distinct_rows_per_read,
                "collision_lookups": self.collision_lookups, "collision_share": self.collision_share}


def _natural(value: tuple[str, ...]) -> tuple:
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in value)

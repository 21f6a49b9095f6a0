"""SmallFetch: a decode-sized fetch (a few ids of each of several same-shaped tables) in one pass.

Generation reads B x H rows per Engram layer and token: 8 tables x 1 id at batch 1. The general
fetch (FetchRound) routes each table on its own (a dedup, a sort and a slice of a shared-memory
reply buffer per table), which at this size costs more than the rows. Here the tables' ids are one
(K, n) matrix: deduplicated in one sort of (table, id) keys (each table's distinct ids go out, as
in the general path), every home found at once (id % N, the hot maps looked up only for tables
that have hot rows), the rows back in the gRPC reply (a shared-memory file is not worth a few
KiB) and spread into one (K, n, width) array. A request a
shard refuses because rows moved raises RowsMoved: the caller re-fetches through the general
path, which re-routes and re-sends.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, RowsMoved
from memory_service.router import Router
from memory_service.rpc import memory_pb2
from memory_service.wire import codec
from memory_service.wire.direct_reads import DirectReads
from memory_service.wire.transport import Transport

MAX_SMALL_ROWS = 4096  # ids summed over the tables: a decode step (batch 16 x 8 tables = 128) and more


def fits(configs: list[TableConfig], num_ids: int) -> bool:
    """Whether a fetch of `num_ids` ids (summed) of tables `configs` takes the short path: small,
    and every table of one width and dtype (so their rows stack), none quantized (their packed
    rows take the general path, which dequantizes them)."""
    return 0 < num_ids <= MAX_SMALL_ROWS and len({(c.width, c.dtype) for c in configs}) == 1 \
        and not any(c.is_quantized for c in configs)


class SmallFetch:
    """Rows of `ids` (K, n) int64, row k of table `configs[k]`, as of table step `min_step`;
    `trace(event, fields)` is told of each request sent."""

    def __init__(self, transport: Transport, router: Router, configs: list[TableConfig], ids: np.ndarray,
                 min_step: int, trace: Callable[[str, dict], None] | None = None,
                 direct: DirectReads | None = None):
        self.transport, self.configs, self.ids, self.min_step, self.trace = transport, configs, ids, min_step, trace
        self.direct = direct  # same-host reads from the shards' shared arenas, tried first
        self.width, self.dtype = configs[0].width, configs[0].dtype
        self._check_ids()
        # every table's distinct ids in one sort: key k * M + id orders them by (table, id)
        self.span = max(c.num_rows for c in configs)  # M
        keys, self.inverse = np.unique(np.arange(len(configs))[:, None] * self.span + ids, return_inverse=True)
        self.table_of, distinct = np.divmod(keys, self.span)  # (u,) each
        home = self._homes(router, distinct)  # (u,)
        self.order = np.argsort(home, kind="stable")  # (u,) by shard, then (table, id)
        self.home, self.distinct = home[self.order], distinct[self.order]
        self.sent: list[tuple[int, int, list[tuple[int, int, int]], Future]] = []  # (start, stop, [(k, a, b)], reply)

    def _check_ids(self) -> None:
        """InvalidArgument naming the first id outside its table's rows."""
        num_rows = np.array([c.num_rows for c in self.configs], np.int64)[:, None]  # (K, 1)
        bad = (self.ids < 0) | (self.ids >= num_rows)
        if bad.any():
            k, i = np.argwhere(bad)[0]
            raise InvalidArgument(f"table {self.configs[k].name!r}: row id {int(self.ids[k, i])} out of range "
                                  f"[0, {self.configs[k].num_rows})")

    def _homes(self, router: Router, distinct: np.ndarray) -> np.ndarray:
        """(u,) the home shard of each distinct id: cold shard id % N, or where its table has hot
        rows, what its hot map says."""
        home = distinct % router.num_cold
        for k, cfg in enumerate(self.configs):
            if len(router.hot_ids(cfg.name)):
                mine = self.table_of == k
                home[mine] = router.home_of(cfg.name, distinct[mine])
        return home

    def send(self) -> "SmallFetch":
        """One request per shard that is home of some id, unless its rows were read from the
        shard's shared arena (same host); nothing waits here."""
        self.grouped = np.empty((len(self.order), self.width), "<f4" if self.dtype == "float32" else "<u2")  # (u, w)
        bounds = np.flatnonzero(np.diff(self.home)) + 1
        for start, stop in zip([0, *bounds.tolist()], [*bounds.tolist(), len(self.home)]):
            tables = self._tables(start, stop)
            shard = int(self.home[start])
            if self._read_direct(shard, start, stop, tables):
                continue
            request = memory_pb2.FetchRequest(min_step=self.min_step, tables=[
                memory_pb2.TableIds(table=self.configs[k].name, ids=codec.encode_ids(self.distinct[a:b]))
                for k, a, b in tables])
            if self.trace is not None:
                self.trace("fetch_sent", {"shard": shard, "step": self.min_step})
            self.sent.append((start, stop, tables, self.transport.start(shard, "Fetch", request)))
        return self

    def _read_direct(self, shard: int, start: int, stop: int, tables: list[tuple[int, int, int]]) -> bool:
        """Whether the shard's slice [start, stop) was read from its shared arena into `grouped`."""
        if self.direct is None:
            return False
        items = [(self.configs[k], self.distinct[a:b], self.grouped[a:b]) for k, a, b in tables]
        if not self.direct.read(shard, items, self.min_step):
            return False
        if self.trace is not None:
            self.trace("fetch_sent", {"shard": shard, "step": self.min_step, "direct": True})
        return True

    def _refetch(self, refused: list[tuple[int, int, int]], refetch) -> None:
        """Fills the refused slices [(table k, a, b)] of `grouped` through `refetch`."""
        parts: dict[str, list[tuple[int, int]]] = {}
        for k, a, b in refused:
            parts.setdefault(self.configs[k].name, []).append((a, b))
        rows = refetch({name: np.concatenate([self.distinct[a:b] for a, b in spans]) for name, spans in parts.items()})
        for name, spans in parts.items():
            table_rows = np.asarray(rows[name], dtype=np.float32).reshape(-1, self.width)
            if self.dtype != "float32":  # bf16 values: their bits are exact
                table_rows = codec.float32_to_bfloat16_bits(table_rows)
            at = 0
            for a, b in spans:
                self.grouped[a:b] = table_rows[at:at + b - a]
                at += b - a

    def _tables(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """[(table k, a, b)]: the tables of one shard's slice [start, stop), each contiguous."""
        tables = self.table_of[self.order[start:stop]]
        cuts = [start, *(start + np.flatnonzero(np.diff(tables)) + 1).tolist(), stop]
        return [(int(tables[a - start]), a, b) for a, b in zip(cuts[:-1], cuts[1:])]

    def rows(self, refetch=None) -> np.ndarray:
        """Waits for every reply: (K, n, width) float32 (bf16 widened). The requests a shard
        refused because rows moved are fetched again alone, by `refetch({table: distinct ids})
        -> {table: float32 rows}` (the general path, after a refresh of the hot maps): the shards
        that answered are not asked twice. Without `refetch`, RowsMoved."""
        itemsize = codec.ITEMSIZE[self.dtype]
        grouped = self.grouped  # (u, w): direct reads in place already
        refused: list[tuple[int, int, int]] = []
        for _, _, tables, future in self.sent:
            try:
                response = self.transport.result(future)
            except RowsMoved:
                if refetch is None:
                    raise
                refused += tables
                continue
            for (k, a, b), rows in zip(tables, response.tables):
                codec.check_reply_dtype(self.configs[k], rows)
                if len(rows.rows) != (b - a) * self.width * itemsize:
                    raise InvalidArgument(f"table {self.configs[k].name!r}: shard replied {len(rows.rows)} "
                                          f"bytes, expected {(b - a) * self.width * itemsize}")
                grouped[a:b] = np.frombuffer(rows.rows, grouped.dtype).reshape(-1, self.width)
        if refused:
            self._refetch(refused, refetch)
        distinct = np.empty_like(grouped)
        distinct[self.order] = grouped  # (u, w) in key order
        out = distinct[self.inverse.reshape(-1)].reshape(*self.ids.shape, self.width)  # (K, n, w)
        return out if self.dtype == "float32" else codec.bfloat16_bits_to_float32(out)

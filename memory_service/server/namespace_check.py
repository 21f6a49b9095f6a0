"""The namespace check: which tables a request names, and whether a caller whose token is scoped
to namespaces may name them (wire/security.py: NamespaceTokens, Caller).

Admission asks it for every call of a scoped token once the request is parsed, before the
servicer reads or changes any state: every table the request names must be in a namespace the
token has the rpc's scope on (read or write), else PERMISSION_DENIED. ListTables and Stats answer
with the token's namespaces' tables only (Stats without the shard-wide counters and rates, which
sum over every namespace). An rpc this module does not list as naming tables spans namespaces
and needs a cluster-wide token: migration (ExportRows, ImportRows, ReturnRows), DrainAccesses,
DirectReads (the shared arena holds every namespace's rows), CheckpointPause, CheckpointRestore,
a CheckpointSave of every table, and any rpc added later until it is listed here.
"""
from __future__ import annotations

from collections.abc import Callable

from memory_service.config import namespace_of
from memory_service.rpc import memory_pb2
from memory_service.wire.security import HEALTH_SERVICE, Caller, method_scope

# rpc -> the table names its request names; None: it names no tables (it spans namespaces)
TABLES_OF: dict[str, Callable[[object], list[str] | None]] = {
    "CreateTable": lambda r: [r.config.name],
    "DescribeTable": lambda r: [r.name],
    "DropTable": lambda r: [r.name],
    "Fetch": lambda r: [t.table for t in r.tables],
    "Push": lambda r: [t.table for t in r.tables] + [t.table for t in r.announce.tables],
    "CommitStep": lambda r: [t.table for t in r.tables],
    "HotMap": lambda r: [r.table],
    "Announce": lambda r: [t.table for t in r.tables] + [t.table for t in r.direct_reads],
    "CheckpointSave": lambda r: list(r.tables) or None,  # no tables: every table of the shard
    "FreezeTable": lambda r: [r.table],
    "WriteRecords": lambda r: [r.records.table],
    "ReadRecords": lambda r: [r.table],
}
LISTINGS = frozenset({"ListTables", "Stats"})  # narrowed to the caller's namespaces' tables

_RPCS = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].methods_by_name
assert not set(TABLES_OF) - set(_RPCS) and not LISTINGS - set(_RPCS), "namespace_check names an rpc the proto lacks"


def refusal(method: str, request, caller: Caller) -> str | None:
    """Why `caller` may not call `method` ('/package.Service/Method') with `request`, as
    PERMISSION_DENIED's details; None when it may (a cluster-wide token: always)."""
    if caller.is_cluster_wide or method.startswith(f"/{HEALTH_SERVICE}/"):
        return None
    rpc = method.rsplit("/", 1)[1]
    if rpc in LISTINGS:
        return None
    tables_of = TABLES_OF.get(rpc)
    names = tables_of(request) if tables_of is not None else None
    if names is None:
        return (f"{method} spans namespaces: it needs a cluster-wide token; this token is scoped to "
                f"namespaces {sorted(caller.namespaces)}")
    scope = method_scope(method)
    for name in names:
        namespace = namespace_of(name)
        if not caller.may(namespace, scope):
            have = caller.namespaces.get(namespace)
            return (f"{method}: table {name!r} is in namespace {namespace!r}, where this token has "
                    f"{'the read scope only' if have else 'no scope'} ({scope} needed)")
    return None


def narrowed(method: str, response, caller: Caller):
    """`response` as `caller` may see it: ListTables and Stats keep only the tables of its
    namespaces (Stats also drops its shard-wide counters and rates), for a scoped token."""
    if caller.is_cluster_wide or response is None:
        return response
    rpc = method.rsplit("/", 1)[1]
    if rpc == "ListTables":
        return memory_pb2.ListTablesResponse(names=[n for n in response.names if _sees(caller, n)])
    if rpc == "Stats":
        out = memory_pb2.StatsResponse()
        out.CopyFrom(response)
        del out.tables[:]
        out.tables.extend(t for t in response.tables if _sees(caller, t.name))
        for name in ("counters", "fetch", "push"):  # sums over every namespace's tables
            out.ClearField(name)
        return out
    return response


def _sees(caller: Caller, table: str) -> bool:
    return caller.may(namespace_of(table), "read")

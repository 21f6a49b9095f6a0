"""Hostile input, property-based: >= 10,000 malformed or hostile requests against a live shard (a real
gRPC server on 127.0.0.1) that holds rows and Adam state. Every request is built invalid on purpose
(one or more mutations of a valid one, or random bytes), sent as raw bytes, and must be answered
with a status its kind documents (proto/engram_memory/v1/memory.proto's error policy), never
UNKNOWN or INTERNAL; the shard keeps serving, and its digest does not move until one valid push."""
from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_service.wire import codec
from memory_service.config import MAX_TABLE_ROWS, OptimizerConfig, TableConfig
from memory_service.storage.optimizer import MAX_STEP_AHEAD
from memory_service.rpc import memory_pb2
from memory_service.server.servicer import SERVICE_NAME, serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

Code = grpc.StatusCode
# Shard 0 of 2: even ids are its own, odd ones another shard's.
ADAM = TableConfig(name="adam", num_rows=1000, width=8, seed=1,
                   optimizer=OptimizerConfig(kind="adam", lr=0.01, beta1=0.9, beta2=0.95))
SPARSE = TableConfig(name="sparse", num_rows=500, width=4, dtype="bfloat16", seed=2, collision_sample_rate=0.5,
                     optimizer=OptimizerConfig(kind="sparse_adam", lr=0.02))
WIDE = TableConfig(name="wide", num_rows=8192, width=65536, seed=3, optimizer=OptimizerConfig(kind="sgd", lr=0.1))
TABLES = {cfg.name: cfg for cfg in (ADAM, SPARSE, WIDE)}
STEPS = 3  # valid steps pushed to adam and sparse before the fuzz
PUSHED = np.array([0, 2, 4, 6, 10])  # rows pushed at every step (adam: these took step 3)
MIN_REQUESTS = 10_000
BATCH = 24  # requests per hypothesis example
EXAMPLES = MIN_REQUESTS // BATCH + 20

# Statuses a request of each kind may get (the error policy in memory.proto).
FETCH_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
PUSH_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
COMMIT_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
CREATE_CODES = {Code.INVALID_ARGUMENT, Code.ALREADY_EXISTS}
MOVE_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
ANY_DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                  Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.ABORTED}
NEVER = {Code.UNKNOWN, Code.INTERNAL}


@dataclass(frozen=True)
class Case:
    """One request: the method, its bytes, the statuses it may get, and what kind it is."""

    method: str
    payload: bytes
    allowed: frozenset
    kind: str


def _case(rpc: str, message, allowed, kind: str) -> Case:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return Case(f"/{SERVICE_NAME}/{rpc}", payload, frozenset(allowed), kind)


# --- building blocks ------------------------------------------------------------------------------

def own_ids(cfg: TableConfig, max_size: int = 6, unique: bool = True):
    """Lists of this shard's (even) ids of `cfg`."""
    return st.lists(st.integers(0, (cfg.num_rows - 1) // 2).map(lambda i: 2 * i), max_size=max_size,
                    unique=unique)


def bad_id(cfg: TableConfig):
    """An id the shard must refuse: negative, beyond the table, or another shard's."""
    return st.one_of(st.integers(-2**63, -1), st.integers(cfg.num_rows, 2**63 - 1),
                     st.integers(0, (cfg.num_rows - 2) // 2).map(lambda i: 2 * i + 1))


@st.composite
def ids_with_a_bad_one(draw, cfg: TableConfig) -> list[int]:
    ids = draw(own_ids(cfg))
    ids.insert(draw(st.integers(0, len(ids))), draw(bad_id(cfg)))
    return ids


def encode(ids) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


@st.composite
def misaligned(draw, payload: bytes) -> bytes:
    """`payload` (whole int64s) with 1..7 bytes cut or added: not a whole number of int64s."""
    k = draw(st.integers(1, 7))
    if len(payload) >= 8 and draw(st.booleans()):
        return payload[:-k]
    return payload + draw(st.binary(min_size=k, max_size=k))


def unknown_table():
    return st.text(min_size=0, max_size=40).filter(lambda name: name not in TABLES)


def finite_grads(draw, n: int, cfg: TableConfig) -> np.ndarray:
    """(n, width) finite float32 gradients (from a drawn seed: drawing each value costs too much)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    return rng.uniform(-10, 10, (n, cfg.width)).astype(np.float32)


def grads_bytes(grads: np.ndarray, cfg: TableConfig) -> bytes:
    return codec.encode_rows(grads, cfg.dtype)


# --- Fetch ----------------------------------------------------------------------------------------

def _table_ids(cfg: TableConfig, ids) -> memory_pb2.TableIds:
    return memory_pb2.TableIds(table=cfg.name, ids=encode(ids))


@st.composite
def fetch_cases(draw) -> Case:
    cfg = draw(st.sampled_from([ADAM, SPARSE]))
    good = [_table_ids(c, draw(own_ids(c))) for c in (ADAM, SPARSE) if c is not cfg and draw(st.booleans())]
    mutation = draw(st.sampled_from(["bad_id", "misaligned", "unknown", "twice", "ngrams", "ngrams_off",
                                     "shm_path", "shm_missing", "too_wide"]))
    request = memory_pb2.FetchRequest(min_step=draw(st.sampled_from([0, 1, STEPS, 2**64 - 1])))
    codes = {Code.INVALID_ARGUMENT}
    msg = _table_ids(cfg, draw(own_ids(cfg)))
    if mutation == "bad_id":
        msg.ids = encode(draw(ids_with_a_bad_one(cfg)))
    elif mutation == "misaligned":
        msg.ids = draw(misaligned(msg.ids))
    elif mutation == "unknown":
        msg.table, codes = draw(unknown_table()), {Code.NOT_FOUND}
    elif mutation == "twice":
        good.append(_table_ids(cfg, draw(own_ids(cfg))))
    elif mutation == "ngrams":
        msg = _table_ids(SPARSE, draw(own_ids(SPARSE, unique=False)))
        msg.ngrams.CopyFrom(draw(bad_ngrams(len(msg.ids) // 8)))
        good = [g for g in good if g.table != "sparse"]
    elif mutation == "ngrams_off":  # adam keeps no collision stats
        msg = _table_ids(ADAM, draw(own_ids(ADAM)))
        msg.ngrams.lookups = np.ones(len(msg.ids) // 8, "<u4").tobytes()
        good = [g for g in good if g.table != "adam"]
    elif mutation == "shm_path":  # only /dev/shm/engram-reply-* is ever opened
        request.shared_memory.CopyFrom(memory_pb2.SharedMemoryReply(path=draw(st.sampled_from(
            ["/etc/passwd", "/dev/shm/other", "relative", "/dev/shm/engram-reply-x/../../etc/passwd", ""]))))
    elif mutation == "shm_missing":
        request.shared_memory.CopyFrom(memory_pb2.SharedMemoryReply(
            path=f"/dev/shm/engram-reply-fuzz-{draw(st.integers(0, 2**32))}"))
        codes = {Code.FAILED_PRECONDITION}
    elif mutation == "too_wide":  # a small request asking for a reply over the limit
        limit = codec.MAX_REPLY_BYTES // (WIDE.width * 4)
        msg = _table_ids(WIDE, np.arange(draw(st.integers(limit + 1, WIDE.num_rows // 2))) * 2)
        codes = {Code.RESOURCE_EXHAUSTED}
    tables = good + [msg]
    order = draw(st.permutations(range(len(tables))))
    request.tables.extend(tables[i] for i in order)
    return _case("Fetch", request, codes, f"fetch:{mutation}")


@st.composite
def bad_ngrams(draw, n: int) -> memory_pb2.NgramSample:
    """N-gram samples for n ids with one thing wrong (or ids that repeat, which ngrams forbid)."""
    lookups, fingerprints, mixed = np.ones(n, "<u4"), np.arange(n, dtype="<u8"), np.zeros(n, np.uint8)
    pairs = draw(st.integers(0, 3))
    pair_index = np.zeros(pairs, "<u4") if n else np.zeros(0, "<u4")
    pair_fp, pair_lookups = np.zeros(len(pair_index), "<u8"), np.ones(len(pair_index), "<u4")
    what = draw(st.sampled_from(["count", "zero_lookups", "pair_index", "mixed", "pair_lengths", "odd_bytes"]))
    fields = dict(lookups=lookups.tobytes(), fingerprints=fingerprints.tobytes(), mixed=mixed.tobytes(),
                  pair_index=pair_index.tobytes(), pair_fingerprints=pair_fp.tobytes(),
                  pair_lookups=pair_lookups.tobytes())
    if what == "count":
        fields["lookups"] = np.ones(n + draw(st.integers(1, 5)), "<u4").tobytes()
    elif what == "zero_lookups":
        fields["lookups"] = np.zeros(max(n, 1), "<u4").tobytes()
    elif what == "pair_index":
        fields["pair_index"] = np.array([n + draw(st.integers(0, 2**20))], "<u4").tobytes()
        fields["pair_fingerprints"], fields["pair_lookups"] = bytes(8), np.ones(1, "<u4").tobytes()
    elif what == "mixed":
        fields["mixed"] = np.full(max(n, 1), draw(st.integers(2, 255)), np.uint8).tobytes()
    elif what == "pair_lengths":
        fields["pair_fingerprints"] = bytes(8 * (len(pair_index) + 1))
    else:
        field = draw(st.sampled_from(["lookups", "fingerprints", "pair_index"]))
        fields[field] += b"\0"
    return memory_pb2.NgramSample(**fields)


# --- Push and CommitStep --------------------------------------------------------------------------

@st.composite
def valid_grads(draw, cfg: TableConfig) -> memory_pb2.TableGrads:
    """A TableGrads the shard would apply: adam at step STEPS + 1, sparse_adam at a step of its log."""
    ids = draw(own_ids(cfg, unique=cfg.optimizer.kind != "adam"))
    step = STEPS + 1 if cfg.optimizer.kind == "adam" else draw(st.integers(1, STEPS + 5))
    return memory_pb2.TableGrads(table=cfg.name, step=step, dtype=codec.dtype_to_proto(cfg.dtype), width=cfg.width,
                                 ids=encode(ids), grads=grads_bytes(finite_grads(draw, len(ids), cfg), cfg))


NON_FINITE = [math.nan, math.inf, -math.inf]


@st.composite
def bad_grads(draw, cfg: TableConfig) -> tuple[memory_pb2.TableGrads, set, str]:
    """A TableGrads with one thing wrong, the codes it may get, and what."""
    msg = draw(valid_grads(cfg))
    n = len(msg.ids) // 8
    what = draw(st.sampled_from(["non_finite", "bad_id", "misaligned", "grads_length", "width", "dtype", "step0",
                                 "huge_step", "adam_step", "adam_again", "lr", "lr_changed", "unknown"]))
    codes = {Code.INVALID_ARGUMENT}
    if what == "non_finite":
        ids = draw(own_ids(cfg).filter(len)) if not n else None
        if ids is not None:
            msg.ids, n = encode(ids), len(ids)
        grads = finite_grads(draw, n, cfg)
        grads.flat[draw(st.integers(0, grads.size - 1))] = draw(st.sampled_from(NON_FINITE))
        msg.grads = grads_bytes(grads, cfg)
    elif what == "bad_id":
        ids = draw(ids_with_a_bad_one(cfg))
        msg.ids, msg.grads = encode(ids), grads_bytes(finite_grads(draw, len(ids), cfg), cfg)
    elif what == "misaligned":
        msg.ids = draw(misaligned(msg.ids))
    elif what == "grads_length":
        k = draw(st.integers(1, 64))
        msg.grads = msg.grads[:-k] if k <= len(msg.grads) and draw(st.booleans()) else msg.grads + bytes(k)
    elif what == "width":
        msg.width = draw(st.integers(0, 2**32 - 1).filter(lambda w: w != cfg.width))
    elif what == "dtype":
        msg.dtype = draw(st.sampled_from([0, 3, 99, -1, 2**31 - 1]) | st.just(3 - codec.dtype_to_proto(cfg.dtype)))
    elif what == "step0":
        msg.step = 0
    elif what == "huge_step":
        msg.step = draw(st.integers(STEPS + MAX_STEP_AHEAD + 1, 2**64 - 1))
    elif what == "adam_step":  # adam takes steps T or T + 1 only
        cfg = ADAM
        msg = draw(valid_grads(ADAM))
        msg.step = draw(st.integers(1, STEPS - 1) | st.integers(STEPS + 2, STEPS + 10**6))
    elif what == "adam_again":  # a row that already took its step-T gradient
        cfg = ADAM
        ids = sorted(set(draw(own_ids(ADAM))) | {int(draw(st.sampled_from(PUSHED)))})
        msg = memory_pb2.TableGrads(table="adam", step=STEPS, dtype=1, width=8, ids=encode(ids),
                                    grads=grads_bytes(finite_grads(draw, len(ids), ADAM), ADAM))
    elif what == "lr":
        msg.lr = draw(st.sampled_from([*NON_FINITE, -1.0, -1e-300]))
    elif what == "lr_changed":  # a logged step pushed again with another learning rate
        msg.step = draw(st.integers(1, STEPS))
        msg.lr = draw(st.floats(1e-6, 1.0).filter(lambda lr: lr != cfg.optimizer.lr))
    else:
        msg.table, codes = draw(unknown_table()), {Code.NOT_FOUND}
    return msg, codes, what


@st.composite
def push_cases(draw) -> Case:
    cfg = draw(st.sampled_from([ADAM, SPARSE]))
    bad, codes, what = draw(bad_grads(cfg))
    others = [draw(valid_grads(c)) for c in (ADAM, SPARSE) if c.name != bad.table and draw(st.booleans())]
    request = memory_pb2.PushRequest(client_id=draw(st.text(min_size=1, max_size=20)),
                                     contributors=draw(st.sampled_from([0, 1])),
                                     commit_later=draw(st.booleans()))
    extra = draw(st.sampled_from(["", "", "", "client_id", "twice", "contributors"]))  # a second fault, at times
    if extra == "client_id":
        request.client_id = ""
    elif extra == "twice":
        others.append(draw(valid_grads(TABLES[bad.table] if bad.table in TABLES else ADAM)))
        others.append(others[-1])
    elif extra == "contributors":
        request.contributors = draw(st.integers(65537, 2**32 - 1))
    if extra:
        codes = codes | {Code.INVALID_ARGUMENT}
    tables = [*others, bad]
    request.tables.extend(tables[i] for i in draw(st.permutations(range(len(tables)))))
    return _case("Push", request, codes, f"push:{what}{'+' + extra if extra else ''}")


@st.composite
def commit_cases(draw) -> Case:
    cfg = draw(st.sampled_from([ADAM, SPARSE]))
    what = draw(st.sampled_from(["step0", "huge_step", "adam_step", "lr", "lr_changed", "unknown", "twice",
                                 "client_id", "contributors"]))
    step = memory_pb2.TableStep(table=cfg.name, step=draw(st.integers(1, STEPS)))
    request = memory_pb2.CommitStepRequest(client_id="fuzz", contributors=draw(st.sampled_from([0, 1])))
    codes = {Code.INVALID_ARGUMENT}
    if what == "step0":
        step.step = 0
    elif what == "huge_step":
        step.step = draw(st.integers(STEPS + MAX_STEP_AHEAD + 1, 2**64 - 1))
    elif what == "adam_step":
        step = memory_pb2.TableStep(table="adam", step=draw(st.integers(STEPS + 2, 2**40)))
    elif what == "lr":
        step.lr = draw(st.sampled_from([*NON_FINITE, -0.5]))
    elif what == "lr_changed":
        step.lr = draw(st.floats(1e-6, 1.0).filter(lambda lr: lr != cfg.optimizer.lr))
    elif what == "unknown":
        step.table, codes = draw(unknown_table()), {Code.NOT_FOUND}
    elif what == "twice":
        request.tables.append(memory_pb2.TableStep(table=cfg.name, step=STEPS))
    elif what == "client_id":
        request.client_id = ""
    else:
        request.contributors = draw(st.integers(65537, 2**32 - 1))
    request.tables.append(step)
    return _case("CommitStep", request, codes, f"commit:{what}")


# --- CreateTable, DescribeTable, DropTable, HotMap ------------------------------------------------

BAD_CONFIG_FIELDS = {
    "name": st.sampled_from(["", "x" * 257, "tab\tname", "nul\0", "\n"]),
    "num_rows": st.sampled_from([0, MAX_TABLE_ROWS + 1, 2**64 - 1]),
    "width": st.sampled_from([0, 65537, 2**32 - 1]),
    "dtype": st.sampled_from([0, 3, -5]),
    "init_scale": st.sampled_from([0.0, -1.0, *NON_FINITE]),
    "collision_sample_rate": st.sampled_from([-0.1, 1.5, *NON_FINITE]),
}
BAD_OPTIMIZER_FIELDS = {
    "kind": st.sampled_from([0, 5, 1000, -1]),
    "lr": st.sampled_from([0.0, -1.0, *NON_FINITE]),
    "beta1": st.sampled_from([1.0, -0.1, 2.0, math.nan]),
    "beta2": st.sampled_from([1.0, -0.1, math.inf, math.nan]),
    "eps": st.sampled_from([0.0, -1e-8, *NON_FINITE]),
    "initial_accumulator_value": st.sampled_from([-1.0, *NON_FINITE]),
}


@st.composite
def create_cases(draw) -> Case:
    base = draw(st.sampled_from([ADAM, SPARSE, WIDE]))
    msg = codec.table_config_to_proto(base)
    what = draw(st.sampled_from(["config", "optimizer", "no_optimizer", "conflict", "identical"]))
    codes = {Code.INVALID_ARGUMENT}
    if what != "conflict" and what != "identical" and draw(st.booleans()):
        msg.name = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in TABLES))  # a new table
    if what == "config":
        field = draw(st.sampled_from(sorted(BAD_CONFIG_FIELDS)))
        setattr(msg, field, draw(BAD_CONFIG_FIELDS[field]))
    elif what == "optimizer":
        field = draw(st.sampled_from(sorted(BAD_OPTIMIZER_FIELDS)))
        setattr(msg.optimizer, field, draw(BAD_OPTIMIZER_FIELDS[field]))
    elif what == "no_optimizer":
        msg.ClearField("optimizer")
    elif what == "conflict":  # the name of a table that exists, another valid config
        change = draw(st.sampled_from(["num_rows", "width", "seed", "lr", "rate"]))
        if change == "num_rows":
            msg.num_rows += draw(st.integers(1, 10**6))
        elif change == "width":
            msg.width = draw(st.integers(1, 65536).filter(lambda w: w != base.width))
        elif change == "seed":
            msg.seed ^= draw(st.integers(1, 2**64 - 1))
        elif change == "lr":
            msg.optimizer.lr = draw(st.floats(1e-6, 1.0).filter(lambda lr: lr != base.optimizer.lr))
        else:
            msg.collision_sample_rate = draw(st.floats(0, 1).filter(lambda r: r != base.collision_sample_rate))
        codes = {Code.ALREADY_EXISTS}
    else:  # re-creating with the same config is answered and changes nothing
        codes = {Code.OK}
    return _case("CreateTable", memory_pb2.CreateTableRequest(config=msg), codes, f"create:{what}")


@st.composite
def name_cases(draw) -> Case:
    rpc = draw(st.sampled_from(["DescribeTable", "DropTable", "HotMap"]))
    name = draw(unknown_table() | st.text(min_size=300, max_size=5000))
    message = (memory_pb2.HotMapRequest(table=name) if rpc == "HotMap" else
               getattr(memory_pb2, f"{rpc}Request")(name=name))
    return _case(rpc, message, {Code.NOT_FOUND}, f"{rpc}:unknown")


# --- ExportRows, ImportRows -----------------------------------------------------------------------

@st.composite
def export_cases(draw) -> Case:
    cfg = draw(st.sampled_from([ADAM, SPARSE, WIDE]))
    ids = draw(own_ids(cfg))
    what = draw(st.sampled_from(["bad_id", "repeat", "misaligned", "unknown", "too_wide"]))
    request = memory_pb2.ExportRowsRequest(table=cfg.name, version=draw(st.integers(0, 2**64 - 1)))
    codes = {Code.INVALID_ARGUMENT}
    if what == "bad_id":
        request.ids = encode(draw(ids_with_a_bad_one(cfg)))
    elif what == "repeat":
        ids = ids or [0]
        request.ids = encode([*ids, draw(st.sampled_from(ids))])
    elif what == "misaligned":
        request.ids = draw(misaligned(encode(ids)))
    elif what == "unknown":
        request.table, request.ids, codes = draw(unknown_table()), encode(ids), {Code.NOT_FOUND}
    else:
        request.table, request.ids, codes = "wide", encode(np.arange(1100) * 2), {Code.RESOURCE_EXHAUSTED}
    return _case("ExportRows", request, codes, f"export:{what}")


STATE_WIDTH = {"adam": 16, "sparse": 8}  # two moments per value (Adam, SparseAdam)


@st.composite
def import_cases(draw) -> Case:
    cfg = draw(st.sampled_from([ADAM, SPARSE]))
    ids = draw(own_ids(cfg).filter(len))
    n, sw = len(ids), STATE_WIDTH[cfg.name]
    rows = np.zeros((n, cfg.width), "<f4")
    state = np.zeros((n, sw), "<f4")
    last = np.full(n, STEPS, "<i8")
    moved = list(ids)
    what = draw(st.sampled_from(["lengths", "bad_id", "repeat", "outside", "non_finite", "last", "misaligned",
                                 "unknown"]))
    codes = {Code.INVALID_ARGUMENT}
    record_ids = list(ids)
    if what == "lengths":
        field = draw(st.sampled_from(["rows", "state", "last"]))
        k = draw(st.integers(1, 12))
        arrays = {"rows": rows, "state": state, "last": last}
        records = {name: a.tobytes() for name, a in arrays.items()}
        records[field] = records[field][:-k] if draw(st.booleans()) else records[field] + bytes(k)
        request = memory_pb2.ImportRowsRequest(records=memory_pb2.RowRecords(
            table=cfg.name, ids=encode(record_ids), **records), version=1, ids=encode(moved))
        return _case("ImportRows", request, codes, f"import:{what}")
    if what == "bad_id":
        bad = draw(bad_id(cfg))
        record_ids[0] = bad
        moved[0] = bad
    elif what == "repeat":
        record_ids.append(record_ids[0])
        moved.append(moved[0])
        rows, state, last = (np.concatenate([a, a[:1]]) for a in (rows, state, last))
    elif what == "outside":  # records for a row the import does not move
        moved = moved[1:]
    elif what == "non_finite":
        target = draw(st.sampled_from([rows, state]))
        target.flat[draw(st.integers(0, target.size - 1))] = draw(st.sampled_from(NON_FINITE))
    elif what == "last":
        last[0] = draw(st.integers(-2**63, -1))
    elif what == "misaligned":
        moved_bytes = draw(misaligned(encode(moved)))
    elif what == "unknown":
        codes = {Code.NOT_FOUND}
    request = memory_pb2.ImportRowsRequest(records=memory_pb2.RowRecords(
        table=cfg.name if what != "unknown" else draw(unknown_table()), ids=encode(record_ids),
        rows=rows.tobytes(), state=state.tobytes(), last=last.tobytes()),
        version=draw(st.integers(0, 2**64 - 1)), ids=moved_bytes if what == "misaligned" else encode(moved))
    return _case("ImportRows", request, codes, f"import:{what}")


# --- bytes that are no message at all -------------------------------------------------------------

METHODS = sorted(memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].methods_by_name)
# Methods where random bytes that happen to parse could still be a valid, state-changing request
# are left out: the other kinds above cover them with requests built invalid on purpose.
GARBAGE_METHODS = [m for m in METHODS if m not in ("DropTable", "ExportRows", "ImportRows", "CommitStep", "WriteRecords")]


UNPARSABLE = [b"\x0a\xff\xff\xff\x0f",  # field 1 claims 4 GiB
              b"\x12\x05ab",  # field 2 claims 5 bytes, 2 follow
              b"\x08\xff\xff",  # a varint cut short
              b"\x0b",  # a group start, never closed
              b"\x0a\x02\xff\xfe"]  # a string (or message) field of invalid UTF-8 bytes


@st.composite
def garbage_cases(draw) -> Case:
    rpc = draw(st.sampled_from([*GARBAGE_METHODS, "health", "NoSuchMethod"]))
    payload = draw(st.binary(min_size=1, max_size=300) | st.sampled_from(UNPARSABLE))
    case = _case(rpc, payload, {Code.UNIMPLEMENTED} if rpc == "NoSuchMethod" else ANY_DOCUMENTED, f"garbage:{rpc}")
    if rpc == "health":
        return Case("/grpc.health.v1.Health/Check", payload, frozenset(ANY_DOCUMENTED), "garbage:health")
    return case


CASES = st.one_of(fetch_cases(), push_cases(), commit_cases(), create_cases(), name_cases(), export_cases(),
                  import_cases(), garbage_cases())


# --- the shard under attack -----------------------------------------------------------------------

def _primed_shard() -> Shard:
    """Shard 0 of 2 with the three tables, adam and sparse pushed for steps 1..STEPS."""
    shard = Shard(0, 2)
    for cfg in TABLES.values():
        shard.create_table(cfg)
    rng = np.random.default_rng(0)
    for step in range(1, STEPS + 1):
        shard.push("setup", {cfg.name: TablePush(step, PUSHED, rng.standard_normal((len(PUSHED), cfg.width)))
                             for cfg in (ADAM, SPARSE)})
    shard.push("setup", {"wide": TablePush(1, np.array([0]), np.ones((1, WIDE.width)))})
    return shard


@pytest.fixture(scope="module")
def attacked():
    shard = _primed_shard()
    server = serve(shard)
    channel = grpc.insecure_channel(server.address, options=(
        ("grpc.max_send_message_length", 2 * codec.MAX_MESSAGE_BYTES), *codec.MESSAGE_OPTIONS[1:]))
    yield shard, server, channel
    channel.close()
    server.stop(None)


def _send(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(case.method)  # raw bytes both ways: malformed bytes go out as they are
    try:
        call(case.payload, timeout=10)
        return Code.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def test_ten_thousand_hostile_requests_change_nothing(attacked):
    shard, server, channel = attacked
    digest, tables = shard.digest(), shard.list_tables()
    steps = {name: shard.describe_table(name).step for name in tables}
    sent: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(st.lists(CASES, min_size=BATCH, max_size=BATCH))
    def attack(cases: list[Case]) -> None:
        for case in cases:
            code, details = _send(channel, case)
            sent[case.kind] = sent.get(case.kind, 0) + 1
            assert code not in NEVER, f"{case.kind}: {code} {details}"
            assert code in case.allowed, f"{case.kind}: {code} {details!r} not in {sorted(c.name for c in case.allowed)}"
            assert code == Code.OK or details, f"{case.kind}: {code} without a message"

    attack()
    total = sum(sent.values())
    print(f"{total} hostile requests, {len(sent)} kinds:", dict(sorted(sent.items())))
    assert total >= MIN_REQUESTS, f"only {total} requests sent"  # a skipped or cut run fails here
    kinds = {kind.split(":")[0] for kind in sent}
    assert kinds == {"fetch", "push", "commit", "create", "DescribeTable", "DropTable", "HotMap", "export",
                     "import", "garbage"}, kinds
    # still serving, state untouched
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    fetch = memory_pb2.FetchRequest(tables=[_table_ids(ADAM, PUSHED)])
    code, _ = _send(channel, _case("Fetch", fetch, {Code.OK}, "valid"))
    assert code == Code.OK
    assert shard.digest() == digest and shard.list_tables() == tables
    assert {name: shard.describe_table(name).step for name in tables} == steps
    # and one valid push does move it: the digest sees pushes
    grads = np.ones((2, ADAM.width), np.float32)
    push = memory_pb2.PushRequest(client_id="valid", tables=[memory_pb2.TableGrads(
        table="adam", step=STEPS + 1, dtype=1, width=8, ids=encode([0, 2]), grads=grads.tobytes())])
    assert _send(channel, _case("Push", push, {Code.OK}, "valid")) == (Code.OK, "")
    assert shard.digest() != digest


def test_the_per_request_limits_answer_before_anything_is_read(attacked):
    """Payloads claiming more row ids than one request may carry (32 MiB each: too big to send
    thousands of times above), and a small request for a reply over the limit."""
    shard, _, channel = attacked
    digest = shard.digest()
    too_many = bytes(8 * (codec.MAX_REQUEST_ROWS + 1))  # zeros: valid ids, just too many
    requests = {
        "Fetch": memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="adam", ids=too_many)]),
        "Push": memory_pb2.PushRequest(client_id="c", tables=[memory_pb2.TableGrads(
            table="adam", step=STEPS + 1, dtype=1, width=8, ids=too_many)]),
        "ExportRows": memory_pb2.ExportRowsRequest(table="adam", ids=too_many),
        "ImportRows": memory_pb2.ImportRowsRequest(records=memory_pb2.RowRecords(table="adam"), ids=too_many),
    }
    for rpc, request in requests.items():
        code, details = _send(channel, _case(rpc, request, {}, "limit"))
        assert code == Code.RESOURCE_EXHAUSTED, (rpc, code, details)
        assert f"{codec.MAX_REQUEST_ROWS + 1} row ids in one request; at most {codec.MAX_REQUEST_ROWS}" in details
    wide = memory_pb2.FetchRequest(tables=[_table_ids(WIDE, np.arange(1025) * 2)])  # 1025 x 256 KiB
    code, details = _send(channel, _case("Fetch", wide, {}, "limit"))
    assert code == Code.RESOURCE_EXHAUSTED and "would hold 268697600 bytes" in details
    assert shard.digest() == digest

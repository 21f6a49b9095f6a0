"""RemoteTables: the Engram module's tables living in the table service.

Each (layer, order, head) table of the model is one service table whose initial rows are those of
`LocalTables` (same seeds), so a model trains the same whether its rows are here or there.
Forward: the rows of every Engram layer of a batch come in one fetch (one request per shard),
started by `prefetch` as soon as the row ids are known. Backward: a hook on each layer's rows hands
their gradient to a push thread, which deduplicates, sums and sends it as the table step, while
the backward goes on; the optimizer runs on the shards. The announcements of later steps' ids
(placement's look-ahead, `announce`) ride on the next push instead of requests of their own, and
where rows cannot move (no hot shards) so does the step's commit: a step is then one Fetch and one
Push per shard (MemoryClient.push).

The step protocol: `begin_step(step, lr)` before the forward of training step `step` (0-based; its
push is table step `step + 1`), `end_step()` after its backward. A fetch names the table step it
must see (`min_step`); the shards hold it until then, which keeps training exact however early the
fetch is sent.

On a GPU (row ids on CUDA) the rows are copied there from pinned buffers on a side stream as soon
as they arrive, and each gradient is copied to pinned host memory as backward produces it; the
push thread waits for that copy alone, not for the rest of the backward.

Profiling (torch.profiler, with all threads recorded: bench/bench_train_overhead.py --profile)
sees the work as ranges: "engram.fetch" from a fetch's send to its rows ready for the forward
(on a client thread), "engram.wait" where the forward blocked on them, "engram.push" a layer's
push on the push thread.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.rows import table_seed
from memory_service.tables import Announcement
from memory_service.wire.small_fetch import MAX_SMALL_ROWS
from trainer.engram import EngramConfig, EngramTables


def table_labels(cfg: EngramConfig, layer: int, head: int) -> dict[str, str]:
    """What table `head` of `layer` is (TableConfig.labels, for stats per layer, order and head):
    the tables of one layer are all heads of order 2, then of order 3, ... (RowIndexer's columns)."""
    order, order_head = divmod(head, cfg.heads_per_ngram)
    return {"layer": str(layer), "order": str(order + 2), "head": str(order_head)}


def table_name(prefix: str, layer: int, head: int) -> str:
    """The service table of one (order, head) column of an Engram layer's row ids."""
    return f"{prefix}/layer{layer}/head{head}"


@dataclass(eq=False)  # compared by identity: fields hold tensors
class _Pending:
    """A fetch in flight: the row ids it serves (matched by identity) and the layers still to read it."""

    row_ids: dict[int, torch.Tensor]
    future: Future
    unread: set[int] = field(default_factory=set)
    stacked: list[int] | None = None  # decode-sized: the layers whose tables the (K, n, w) rows stack


@dataclass
class FetchTimes:
    """Where fetch time went, summed since the last `reset`: `wait_s` blocked the forward;
    `fetch_s` is the requests' own time (mostly hidden by prefetch)."""

    fetches: int = 0
    wait_s: float = 0.0
    fetch_s: float = 0.0

    def reset(self) -> None:
        self.fetches, self.wait_s, self.fetch_s = 0, 0.0, 0.0


class RemoteTables(EngramTables):
    """`EngramTables` backed by a `MemoryClient`. `sizes`: {layer: row count per head}, as
    `RowIndexer.table_sizes()` gives. With `contributors` K > 1 this is one of K data-parallel
    workers: pushes are its part of each step (gradients scaled by `grad_scale`, e.g. 1/K for a
    mean loss), applied by the shards once all K arrived. `read_only` never pushes."""

    def __init__(self, client: MemoryClient, cfg: EngramConfig, sizes: dict[int, list[int]],
                 optimizer: OptimizerConfig, prefix: str = "engram", read_only: bool = False,
                 contributors: int = 1, grad_scale: float = 1.0, collision_sample_rate: float = 0.0):
        super().__init__()
        self.client, self.cfg, self.read_only = client, cfg, read_only
        self.contributors, self.grad_scale = contributors, grad_scale
        self.names = {layer: [table_name(prefix, layer, h) for h in range(len(s))] for layer, s in sizes.items()}
        self.configs = [TableConfig(table_name(prefix, layer, h), size, cfg.head_width, "float32", cfg.init_scale,
                                    table_seed(cfg.seed, layer, h), optimizer,
                                    collision_sample_rate=collision_sample_rate, labels=table_labels(cfg, layer, h))
                        for layer, layer_sizes in sizes.items() for h, size in enumerate(layer_sizes)]
        self.wants_ngrams = collision_sample_rate > 0  # fetches carry the N-grams for collision stats
        self.times = FetchTimes()
        self.steps_pushed = 0  # table steps this trainer has pushed (its next fetch must see them)
        self._pending: list[_Pending] = []
        self._copy_stream = None  # the side stream of host-to-GPU row copies (created on first use)
        self._step: int | None = None  # table step the current forward's gradients make
        self._lr: float | None = None
        self._pushed: set[int] = set()
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-push")  # in step order
        self._pushes: list[Future] = []
        self._announced: list[Future] = []  # announce hints not yet answered
        self._ahead: Announcement | None = None  # the announcement that rides on the next push

    def create(self) -> "RemoteTables":
        """Creates the tables on every shard (idempotent: attaching to existing tables is fine)
        and starts from the step they are at."""
        for table in self.configs:
            self.client.create_table(table)
        return self._at_current_step()

    def attach(self) -> "RemoteTables":
        """Uses tables that exist (TableNotFound otherwise) after checking they hold this
        model's rows (row count, width, seed); their optimizer is whatever trained them."""
        for want in self.configs:
            have = self.client.table(want.name)
            if (have.num_rows, have.width, have.seed, have.init_scale) != (want.num_rows, want.width, want.seed, want.init_scale):
                raise ValueError(f"table {want.name!r} in the service is not this model's table: "
                                 f"{have.num_rows} rows x {have.width}, seed {have.seed}; expected "
                                 f"{want.num_rows} x {want.width}, seed {want.seed}")
        return self._at_current_step()

    def _at_current_step(self) -> "RemoteTables":
        names = {t.name for t in self.configs}
        steps = {int(t.step) for shard in self.client.stats() for t in shard.tables if t.name in names}
        if len(steps) > 1:
            raise RuntimeError(f"the tables {sorted(names)[0]}.. are at different steps {sorted(steps)} "
                               "on different shards: a push was interrupted; restore a checkpoint")
        self.steps_pushed = max(steps, default=0)
        return self

    # -- forward --------------------------------------------------------------------------------
    def prefetch(self, row_ids: dict[int, torch.Tensor], min_step: int | None = None,
                 ngrams: dict[int, np.ndarray] | None = None) -> None:
        """Starts fetching the rows of `row_ids` {layer: (B, T, H)}, as of table step `min_step`
        (default: every step this trainer pushed); `ngrams` {layer: (B, T, H) uint64} are the
        fingerprints of the N-grams behind the ids, for the tables' collision stats."""
        min_step = self.steps_pushed if min_step is None else min_step
        device = next(iter(row_ids.values())).device
        if ngrams is None and device.type == "cpu" and self._decode_sized(row_ids):
            return self._prefetch_stacked(row_ids, min_step)
        ids = self._per_table(row_ids)
        fingerprints = None if ngrams is None else {
            name: ngrams[layer][..., h] for layer in row_ids for h, name in enumerate(self.names[layer])}
        started = time.perf_counter()
        # quantized tables' rows come packed and are dequantized on the ids' device (`_dequantized`)
        future = self.client.fetch_async(ids, min_step, fingerprints, packed=True)  # requests sent when this returns
        future = self.client.pool.submit(self._arrive, future, device, started)
        self._pending.append(_Pending(row_ids, future, set(row_ids)))

    @staticmethod
    def _decode_sized(row_ids: dict[int, torch.Tensor]) -> bool:
        """Whether a fetch of `row_ids` {layer: (B, T, H)} is decode-sized: every layer's ids of
        one (B, T), and few of them (the client's short path, wire/small_fetch.py)."""
        shapes = {ids.shape[:-1] for ids in row_ids.values()}
        return len(shapes) == 1 and sum(ids.numel() for ids in row_ids.values()) <= MAX_SMALL_ROWS

    def _prefetch_stacked(self, row_ids: dict[int, torch.Tensor], min_step: int) -> None:
        """A decode-sized prefetch: every table's ids as one (K, B*T) matrix (the layers' heads in
        order), one request per shard, rows back as one (K, B*T, w) tensor: no work per table."""
        layers = list(row_ids)
        names = [name for layer in layers for name in self.names[layer]]
        ids = torch.cat([row_ids[layer].reshape(-1, row_ids[layer].shape[-1]).T for layer in layers]).cpu()  # (K, B*T)
        started = time.perf_counter()
        future = self.client.fetch_stacked_async(names, ids, min_step)
        future = self.client.pool.submit(self._arrive, future, torch.device("cpu"), started)  # its profiler range
        self._pending.append(_Pending(row_ids, future, set(layers), stacked=layers))

    def announce(self, row_ids: dict[int, torch.Tensor], min_step: int | None = None) -> None:
        """Tells the rows' homes that a later step reads `row_ids` {layer: (B, T, H)} (a hint for
        placement), with the `min_step` its prefetch will carry; a refusal surfaces at the next
        end_step. A trainer's announcement rides on its next push (no request of its own); one
        already waiting for a push is sent alone first (only one rides a push)."""
        announcement = Announcement(self._per_table(row_ids), min_step)
        if self.read_only:
            self._announced.append(self.client.announce(announcement.ids, announcement.step))
            return
        self._send_ahead()
        self._ahead = announcement

    def _send_ahead(self) -> None:
        """Sends the announcement waiting for a push, alone."""
        if self._ahead is not None:
            self._announced.append(self.client.announce(self._ahead.ids, self._ahead.step))
            self._ahead = None

    def _per_table(self, row_ids: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: (B, T, H)} on any device -> {table: (B, T)} host ids (one copy per layer)."""
        host = {layer: ids.cpu() for layer, ids in row_ids.items()}
        return {name: host[layer][..., h] for layer in host for h, name in enumerate(self.names[layer])}

    def _arrive(self, future: Future, device: torch.device, started: float):
        """On a client thread: waits for a fetch's rows (and copies them to the GPU for CUDA
        ids), timed as `fetch_s` and recorded as the profiler range "engram.fetch"."""
        with record_function("engram.fetch"):
            rows = future.result()
            if device.type == "cuda":
                out = self._to_gpu(rows, device)
            else:  # a stacked (decode-sized) fetch's tensor comes dequantized already
                out = self._dequantized(rows) if isinstance(rows, dict) else rows
        self.times.fetch_s += time.perf_counter() - started
        return out

    def _to_gpu(self, rows: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], object]:
        """The fetched rows copied from pinned host buffers on a side stream, off the compute
        stream; returns them and the event the compute stream waits on before reading them."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            on_gpu = {name: r.pin_memory().to(device, non_blocking=True) for name, r in rows.items()}
            on_gpu = self._dequantized(on_gpu)  # on the side stream, after the copy of the codes
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return on_gpu, done

    def _dequantized(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fetched rows with a quantized table's packed bytes (uint8) dequantized where they are."""
        out = {}
        for name, r in rows.items():
            cfg = self.client.table(name)
            out[name] = dequantize_packed(r, cfg.width, cfg.quantization) if r.dtype == torch.uint8 else r
        return out

    def lookup(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        pending = next((p for p in self._pending if p.row_ids.get(layer) is row_ids), None)
        if pending is None:  # nobody prefetched these ids: fetch now
            self.prefetch({layer: row_ids})
            pending = self._pending[-1]
        started = time.perf_counter()
        with record_function("engram.wait"):
            fetched = pending.future.result()
        if isinstance(fetched, tuple):  # on the GPU: order the compute stream after the copy
            fetched, done = fetched
            stream = torch.cuda.current_stream(row_ids.device)
            stream.wait_event(done)
            for r in fetched.values():
                r.record_stream(stream)  # the allocator must not reuse them before this stream is done
        self.times.wait_s += time.perf_counter() - started
        self.times.fetches += 1
        pending.unread.discard(layer)
        if not pending.unread:
            self._pending.remove(pending)
        if pending.stacked is not None:  # (K, B*T, w), the layers' heads in order
            first = sum(len(self.names[before]) for before in pending.stacked[:pending.stacked.index(layer)])
            H = len(self.names[layer])
            rows = fetched[first:first + H].permute(1, 0, 2).reshape(*row_ids.shape[:-1], -1)  # (B, T, H * w)
        else:
            rows = torch.cat([fetched[name] for name in self.names[layer]], dim=-1)  # (B, T, H * w), ids' device
        rows = rows.to(row_ids.device)  # rows fetched without prefetch arrive on the host
        if torch.is_grad_enabled() and not self.read_only:
            if self._step is None:
                raise RuntimeError("RemoteTables: call begin_step(step, lr) before a training forward "
                                   "(or run it under torch.no_grad())")
            rows.requires_grad_(True)
            rows.register_hook(lambda grad, layer=layer, ids=row_ids, step=self._step, lr=self._lr:
                               self._on_grad(layer, ids, grad, step, lr))
        return rows

    # -- backward -------------------------------------------------------------------------------
    def begin_step(self, step: int, lr: float) -> None:
        """Training step `step` (0-based) begins: its gradients are table step `step + 1` at `lr`."""
        self._step, self._lr, self._pushed = step + 1, float(lr), set()

    def _on_grad(self, layer: int, row_ids: torch.Tensor, grad: torch.Tensor, step: int, lr: float) -> None:
        """Backward reached this layer's rows: hand their gradient to the push thread."""
        H, w = len(self.names[layer]), self.cfg.head_width
        grads = grad.detach().reshape(-1, H, w)  # (B*T, H, w)
        ids = row_ids.detach().reshape(-1, H)  # (B*T, H)
        if self.grad_scale != 1.0:
            grads = grads * self.grad_scale
        copied = None
        if grads.is_cuda:  # to pinned host memory, ordered after this gradient's kernels only
            ids, grads = _pinned_copy(ids), _pinned_copy(grads)
            copied = torch.cuda.Event()
            copied.record()
        announce, self._ahead = self._ahead, None  # the step's first push carries it
        self._pushes.append(self._pusher.submit(self._push, layer, ids, grads, step, lr, copied, announce))
        self._pushed.add(layer)

    def _push(self, layer: int, ids: torch.Tensor, grads: torch.Tensor, step: int, lr: float,
              copied=None, announce: Announcement | None = None) -> int:
        """On the push thread: one layer's (B*T, H) ids and (B*T, H, w) gradients as its tables'
        step, once their copy from the GPU (`copied`, a CUDA event) is done, carrying `announce`."""
        with record_function("engram.push"):
            if copied is not None:
                copied.synchronize()
            tables = {name: (ids[:, h], grads[:, h]) for h, name in enumerate(self.names[layer])}
            return self.client.push(tables, step, lr, self.contributors, announce=announce)

    def end_step(self) -> None:
        """The step's backward ended: every layer must have pushed; surfaces failed pushes."""
        missing = set(self.names) - self._pushed
        if missing:
            raise RuntimeError(f"step {self._step}: Engram layers {sorted(missing)} got no gradient to push")
        self.steps_pushed, self._step = self._step, None
        done = [f for f in self._pushes + self._announced if f.done()]
        self._pushes = [f for f in self._pushes if not f.done()]
        self._announced = [f for f in self._announced if not f.done()]
        for f in done:
            f.result()  # raises a push's (or announcement's) error here, in the training loop

    def flush(self) -> None:
        """Waits until every push sent so far was applied (or raises its error); an announcement
        still waiting for a push goes alone."""
        self._send_ahead()
        pushes, self._pushes = self._pushes, []
        for f in pushes:
            f.result()

    def close(self) -> None:
        self.flush()
        self._pusher.shutdown(wait=True)


def dequantize_packed(packed: torch.Tensor, width: int, kind: str) -> torch.Tensor:
    """Packed rows (..., 4 * stored_width) uint8 (memory_service/quantization.py's layout: a
    float32 scale, then `width` codes) -> (..., width) float32 on their device: code value *
    scale in float32, the same bits as quantization.dequantize (tests/trainer/test_remote_quantized.py)."""
    scale = packed[..., :4].contiguous().view(torch.float32)  # (..., 1)
    codes = packed[..., 4:4 + width].contiguous()  # (..., width)
    values = codes.view(torch.float8_e4m3fn if kind == "fp8_e4m3" else torch.int8).to(torch.float32)
    return values * scale


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of CUDA tensor `t`, started on the current stream (not waited for)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


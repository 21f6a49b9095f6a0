"""`engram import` and `engram export`: tables from and to safetensors files (memory_service/transfer/).

    engram import model.safetensors --tensor emb --table qwen/ngram --optimizer sgd --targets HOST:PORT,...
    engram export --table run1/layer2/head0 out.safetensors --with-state

An import is resumable: its progress file (FILE.<table>.import.json beside the file, or --progress)
records each chunk the shards acknowledged, and the same command run again continues there.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

from trainer.cli.options import (CLIENT_ADDRESS_HELP, CommandError, add_client_security_args, add_cluster_args,
                                 client_security, client_settings, positive_float, positive_int, ray_address)


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator["MemoryClient"]:  # noqa: F821 - imported lazily
    """A client of the shards `--targets`, or of the tables cluster `--name` at `--address`."""
    name, tls_ca = client_settings(args)
    address = None if args.targets else ray_address(args.address)
    security = client_security(args, tls_ca)
    from memory_service.client import MemoryClient

    if args.targets:
        with MemoryClient(args.targets.split(","), shared_memory=False, security=security) as client:
            yield client
        return
    from memory_service.cluster import connect

    cluster = connect(address, name=name)
    try:
        with cluster.client(shared_memory=False, security=security) as client:
            yield client
    finally:
        cluster.shutdown()  # detaches only: the shards keep serving


def _config(args: argparse.Namespace):
    """The table's config from the flags, or None (the file's metadata) when none is given."""
    from memory_service.config import OptimizerConfig, TableConfig
    from memory_service.transfer.safetensors_file import SafetensorsReader

    flags = (args.optimizer, args.lr, args.dtype, args.seed, args.init_scale)
    if all(flag is None for flag in flags):
        return None
    reader = SafetensorsReader(args.file)
    shape = reader.tensor(args.tensor).shape
    if len(shape) != 2:
        raise CommandError(f"tensor {args.tensor!r} has shape {list(shape)}: a table imports a [rows, width] tensor")
    return TableConfig(args.table, shape[0], shape[1], dtype=args.dtype or "float32",
                       init_scale=args.init_scale or 1.0, seed=args.seed or 0,
                       optimizer=OptimizerConfig(args.optimizer or "sparse_adam",
                                                 lr=args.lr if args.lr is not None else 1e-3))


class _ProgressLine:
    """Rows done, rows/s and time left on stderr, at most once per second."""

    def __init__(self) -> None:
        self._shown = 0.0

    def __call__(self, done: int, total: int, seconds: float) -> None:
        if time.monotonic() - self._shown < 1.0 and done < total:
            return
        self._shown = time.monotonic()
        rate = done / max(seconds, 1e-9)
        end = "\r" if sys.stderr.isatty() and done < total else "\n"
        print(f"  {done}/{total} rows ({100 * done / total:.1f}%), {rate:,.0f} rows/s, "
              f"ETA {(total - done) / max(rate, 1e-9):.0f} s", end=end, file=sys.stderr, flush=True)


def cmd_import(args: argparse.Namespace) -> int:
    """Import tensor --tensor of FILE as table --table, resumably, and check its checksum."""
    from memory_service.transfer import import_table

    cfg = _config(args)
    with _client(args) as client:
        result = import_table(client, args.file, args.tensor, args.table, cfg, chunk_rows=args.chunk_rows,
                              progress_path=args.progress, with_state=not args.no_state,
                              on_progress=_ProgressLine())
    print(f"imported {args.file}:{args.tensor} into {args.table!r}: {result.num_rows} rows, "
          f"{result.chunks_written} chunks written, {result.chunks_skipped} done before, in {result.seconds:.1f} s "
          f"({result.num_rows / max(result.seconds, 1e-9):,.0f} rows/s)\n"
          f"checksum {result.checksum} (verified: the shards' rows read back match the file)\n"
          f"progress file {result.progress_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write table --table to OUT as safetensors."""
    from memory_service.transfer import export_table

    started = time.monotonic()
    with _client(args) as client:
        checksum = export_table(client, args.table, args.out, with_state=args.with_state, dtype=args.dtype,
                                chunk_rows=args.chunk_rows)
    print(f"exported {args.table!r} to {args.out} in {time.monotonic() - started:.1f} s"
          f"{' with optimizer state' if args.with_state else ''}; checksum {checksum}")
    return 0


def _add_connection(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p, CLIENT_ADDRESS_HELP)
    p.add_argument("--targets", default=None, help="comma-separated cold shard gRPC targets instead of --address")
    p.add_argument("--chunk-rows", type=positive_int, default=65536, metavar="N",
                   help="rows per chunk (default 65536): the client holds one chunk at a time")
    add_client_security_args(p)


def add_parsers(sub) -> None:
    p = sub.add_parser("import", help="import a [rows, width] tensor of a safetensors file as a table (resumable)")
    p.add_argument("file", help="the safetensors file (F32, BF16, F16 or F8_E4M3 rows)")
    p.add_argument("--tensor", required=True, help="the tensor to import (an engram export's is 'rows')")
    p.add_argument("--table", required=True, help="the table to create and fill (namespace/name)")
    p.add_argument("--optimizer", default=None, choices=("sparse_adam", "adam", "adagrad", "sgd"),
                   help="the table's optimizer (default sparse_adam). Without any table flag an engram export's "
                        "own config (in its metadata) is used")
    p.add_argument("--lr", type=positive_float, default=None, help="the optimizer's learning rate (default 1e-3)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="the dtype rows travel in (default float32; shards store float32 either way)")
    p.add_argument("--seed", type=int, default=None, help="seed of rows never written (default 0)")
    p.add_argument("--init-scale", type=positive_float, default=None, help="std of rows never written (default 1)")
    p.add_argument("--progress", default=None, metavar="PATH",
                   help="the progress file (default: FILE.<table>.import.json beside FILE)")
    p.add_argument("--no-state", action="store_true",
                   help="import rows only, even from an export holding optimizer state")
    _add_connection(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a table to a safetensors file (optionally with its optimizer state)")
    p.add_argument("out", help="the safetensors file to write (written as OUT.partial, then renamed)")
    p.add_argument("--table", required=True, help="the table to export")
    p.add_argument("--with-state", action="store_true",
                   help="also write optimizer state, last steps and step log: re-imported, training continues "
                        "bit for bit (rows float32)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="rows' dtype in the file (default: the table's; float32 with --with-state)")
    _add_connection(p)
    p.set_defaults(func=cmd_export)

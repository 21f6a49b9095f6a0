"""The `engram` command. It parses argv into config dataclasses and calls plain functions; it is the
top layer, so the table service never imports the trainer.

One module per family of commands: training.py (train-local, train, demo, generate), serving.py
(serve, stop), operations.py (stats, checkpoint, freeze), transfer.py (import, export); options.py holds
the flags they share. Nothing heavy loads before a command runs (torch and Ray load inside the command functions), so `engram
--help` and a usage error answer at once. Exit codes: 0 done, 1 the command failed (one line
`engram <cmd>: <why>` on stderr; `--log-level debug` adds the traceback), 2 a usage or config
error (one line), 130 interrupted."""
from __future__ import annotations

import argparse
import logging
import sys

from trainer import colocation

colocation.apply()  # before torch loads: the embedded cluster's shards share these cores

from trainer.cli import logs, operations, serving, training, transfer  # noqa: E402
from trainer.cli.options import CommandError  # noqa: E402

log = logging.getLogger("engram")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`engram serve: --shards: ...`), exit 2; the
    usage itself is what `--help` is for."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed distribution's version, or the source tree's when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("engram-memory")
    except metadata.PackageNotFoundError:
        import memory_service

        return getattr(memory_service, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="engram", description="Engram memory: train, generate with and serve hashed N-gram tables")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_LazyVersion()}")
    parser.add_argument("--log-level", default="warning", choices=logs.LEVELS,
                        help="messages from this level up reach stderr (debug also shows tracebacks)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.add_parsers(sub)
    serving.add_parsers(sub)
    operations.add_parsers(sub)
    transfer.add_parsers(sub)
    return parser


class _LazyVersion:
    """The version string, looked up only when `--version` prints it."""

    def __str__(self) -> str:
        return version()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup(args.log_level, args.log_json)
    command = " ".join(filter(None, ["engram", args.command, getattr(args, "action", None)]))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - every failure is one line; the traceback at debug
        return _fail(command, err)


def _fail(command: str, err: Exception) -> int:
    """Print `err` as one line, `engram <cmd>: <message>`; return 2 for a config error, else 1."""
    from memory_service.config_file import ConfigError

    log.debug("%s failed", command, exc_info=err)
    known = isinstance(err, (CommandError, ValueError, ConnectionError, TimeoutError, OSError)) or \
        type(err).__module__.startswith("memory_service")
    text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename and err.strerror \
        else " ".join(str(err).split()) or type(err).__name__
    print(f"{command}: {text if known else f'{type(err).__name__}: {text}'}", file=sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1



"""Flags every command that reaches a tables cluster spells alike (`--config`, `--name`/`--cluster`,
`--address`, the client's TLS), the values they resolve to, and the command's failures.

Nothing heavy is imported here (no Ray, no torch, no gRPC): `engram --help` builds every parser."""
from __future__ import annotations

import argparse
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memory_service.wire.security import ClientSecurity

TOKEN_VAR = "ENGRAM_TOKEN"
CHECK_ADDRESS_S = 3.0  # a Ray head that does not accept a TCP connection in 3 s is not there


CLIENT_ADDRESS_HELP = "Ray cluster the shards run on (default: $RAY_ADDRESS, else the one running on this machine)"

class CommandError(Exception):
    """A command could not do its work (no such cluster, nothing listening): one line, exit 1."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 and finite")
    return value


def size(text: str) -> int:
    """Bytes from '4GiB', '512MiB', '1GB' or a plain int (memory_service.config_file.parse_size)."""
    from memory_service.config_file import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# argparse names a type's failure by the function's __name__ ("invalid positive_int value")
positive_int.__name__, non_negative_int.__name__, positive_float.__name__ = "positive int", "int >= 0", "positive number"


def add_cluster_args(p: argparse.ArgumentParser, address_help: str, name_default: str | None = None) -> None:
    """`--config`, `--name` (alias `--cluster`) and `--address`, the same in every command."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the tables cluster's YAML config (engram serve's): its name and TLS CA are read from it")
    p.add_argument("--name", "--cluster", dest="name", default=name_default,
                   help=f"tables cluster name, as given to engram serve (default: the config's, else "
                        f"{name_default or 'default'!r})")
    p.add_argument("--address", default=None, help=address_help)


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """TLS of a client of secured shards; the token comes from $ENGRAM_TOKEN (a token on the
    command line would show in `ps`)."""
    p.add_argument("--tls-ca", default=None,
                   help="PEM of the CA that signed the shards' certificates (turns TLS on; default: the config's "
                        "security.tls_ca). Token: $ENGRAM_TOKEN")
    p.add_argument("--tls-cert", default=None, help="this client's certificate (PEM), for shards that require one")
    p.add_argument("--tls-key", default=None, help="this client's private key (PEM)")
    p.add_argument("--tls-server-name", default=None, help="name the shards' certificates carry, if not their address")


def client_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    """(cluster name, TLS CA) of a client command: its flags over its `--config` file."""
    name, tls_ca = args.name, getattr(args, "tls_ca", None)
    if args.config is not None:
        from memory_service.config_file import read_fields

        fields, tls = read_fields(args.config, {})
        name = name or fields.get("name")
        tls_ca = tls_ca or tls.tls_ca or tls.tls_cert  # a self-signed shard certificate is its own CA
    return name or "default", tls_ca


def client_security(args: argparse.Namespace, tls_ca: str | None = None) -> "ClientSecurity | None":
    """ClientSecurity from the TLS flags (or `tls_ca` from the config) and $ENGRAM_TOKEN; None
    when neither is given."""
    from memory_service.wire.security import ClientSecurity, read_pem

    token = os.environ.get(TOKEN_VAR) or None
    tls_ca = tls_ca or args.tls_ca
    if not (tls_ca or args.tls_cert or token):
        return None
    # read here: Ray Train workers run on other nodes and in a folder of Ray's, where paths break
    try:
        root, cert, key = (read_pem(path, flag) for path, flag in ((tls_ca, "--tls-ca"), (args.tls_cert, "--tls-cert"),
                                                                   (args.tls_key, "--tls-key")))
    except ValueError as err:
        raise CommandError(str(err)) from None
    return ClientSecurity(root_cert=root, token=token, client_cert=cert, client_key=key,
                          server_name=args.tls_server_name)


def ray_address(address: str | None, default: str | None = "auto") -> str | None:
    """The Ray cluster a command attaches to: `--address`, else $RAY_ADDRESS, else `default`
    ("auto": the cluster `ray start` left on this machine; None: none, the embedded one). A
    host:port that accepts no TCP connection is a CommandError at once: Ray itself would wait
    ~40 s and then print a page."""
    address = address or os.environ.get("RAY_ADDRESS") or default
    if address is not None:
        check_reachable(address)
    return address


def check_reachable(address: str) -> None:
    """CommandError unless `address` ('auto', 'ray://...', or host:port) accepts a connection."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"--address {address!r} must be host:port, 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CHECK_ADDRESS_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CommandError(f"no Ray cluster at {address} ({reason.lower()}); start one with `ray start --head` "
                           f"or pass --address") from None

"""Who may call a shard: TLS on its gRPC server and bearer tokens with a read or a write scope.

Server side, `SecurityConfig` (serve(security=...), ClusterConfig.security): a certificate and key
turn TLS on; a client CA makes it mutual (a client without a certificate signed by that CA fails
the handshake: UNAVAILABLE); read and write token digests turn tokens on: every call must carry
the metadata `authorization: Bearer <token>` (`AuthInterceptor`). A missing or unknown token is
UNAUTHENTICATED; a read token on a method outside READ_METHODS is PERMISSION_DENIED. A write token
may call everything. Methods are write scope unless listed as reads, so an rpc added later is
closed to read tokens until someone decides otherwise.

Namespaces: besides those cluster-wide tokens, a token may be scoped to namespaces
(`NamespaceTokens`: a namespace is a table name's part before its first "/",
config.namespace_of), with read or write on each. Its `Caller` then may call an rpc only on
tables of its namespaces, with the scope the rpc needs there: server/namespace_check.py reads the
tables each request names (PERMISSION_DENIED otherwise) and narrows ListTables and Stats to them;
rpcs that span namespaces (migration, DrainAccesses, DirectReads, whole-shard checkpoints, and
any rpc added later until it says which tables it names) need a cluster-wide token.

The default `SecurityConfig()` is open (no TLS, no tokens), as the embedded cluster on 127.0.0.1
needs; serving a host other than loopback without TLS warns (`InsecureBindWarning`).

Client side, `ClientSecurity` (MemoryClient(security=...)): the CA that signed the servers'
certificates, the client's own certificate for mutual TLS, and the token it sends as gRPC call
credentials, which gRPC sends only over TLS or to a loopback address: tokens across a network
need TLS.

Tokens are kept as sha256 digests on the server (a config pickled into Ray actors or printed in a
log never holds a usable token) and compared with hmac.compare_digest. PEM material is given as
bytes, or as a str path read where the server or channel is built (a shard reads the files
mounted on its own node).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from memory_service.errors import status_details
from memory_service.rpc import memory_pb2

MEMORY_SERVICE = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"
# The read scope: calls that change no rows. Everything else (Push, CommitStep, CreateTable,
# DropTable, ExportRows, ImportRows, DrainAccesses, and any rpc added later) needs a write token.
# Announce is a reader's: it only hints placement, as a Fetch's reads do, and carries the count of
# a reader's direct reads (DirectReads: where a same-host reader finds the shared-memory arena).
# ReadRecords reads rows with their optimizer state as stored (export), changing nothing.
READ_METHODS = frozenset(f"/{MEMORY_SERVICE}/{name}" for name in
                         ("Fetch", "Stats", "DescribeTable", "ListTables", "HotMap", "Announce", "DirectReads",
                          "ReadRecords"))
METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
PEM = str | bytes  # bytes: PEM contents; str: the path of a PEM file

_missing = [m for m in READ_METHODS if m.rsplit("/", 1)[1] not in
            memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].methods_by_name]
assert not _missing, f"READ_METHODS names rpcs the proto does not have: {_missing}"


class InsecureBindWarning(UserWarning):
    """A shard serves a non-loopback address without TLS: its traffic and tokens travel in clear."""


def token_digest(token: str) -> str:
    """The sha256 hex digest a server keeps for `token` (what SecurityConfig's digests hold)."""
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("a token must be 1 or more visible ASCII characters (no spaces): it travels "
                         "in the header 'authorization: Bearer <token>'")
    return hashlib.sha256(token.encode()).hexdigest()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_pem(value: PEM | None, what: str) -> bytes | None:
    """PEM bytes from bytes (as is) or from a path (read now); ValueError naming `what` if the
    file cannot be read."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{what}: cannot read PEM file {value!r}: {err.strerror}") from None


def _check_pem(value: object, what: str) -> None:
    if value is not None and not isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be PEM bytes or a file path, got {type(value).__name__}")
    if value is not None and not value:
        raise ValueError(f"{what} must not be empty")


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches TLS / token shards. TLS is on when `root_cert` or `client_cert` is
    set, or `tls` (then the system's roots verify the server). `client_cert`/`client_key`: the
    client's certificate for mutual TLS. `token`: sent as 'authorization: Bearer <token>' on every
    call. `server_name`: the name the server certificate must carry, when it differs from the
    target's host (grpc.ssl_target_name_override)."""

    root_cert: PEM | None = None
    token: str | None = field(default=None, repr=False)
    client_cert: PEM | None = None
    client_key: PEM | None = field(default=None, repr=False)
    server_name: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        for name in ("root_cert", "client_cert", "client_key"):
            _check_pem(getattr(self, name), f"ClientSecurity.{name}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("ClientSecurity: client_cert and client_key go together")
        if self.token is not None:
            token_digest(self.token)  # checks its characters

    @property
    def is_tls(self) -> bool:
        return self.tls or self.root_cert is not None or self.client_cert is not None

    def channel(self, target: str, options: tuple = ()) -> grpc.Channel:
        """A channel to `target` ('host:port') with this security: TLS or plain, and the token on
        every call as gRPC call credentials. gRPC sends call credentials only over TLS or to a
        loopback address (local credentials), never in clear across a network: a token without
        TLS to another host is a ValueError here."""
        if self.is_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(self.root_cert, "root_cert"),
                private_key=read_pem(self.client_key, "client_key"),
                certificate_chain=read_pem(self.client_cert, "client_cert"))
            if self.server_name:
                options = (*options, ("grpc.ssl_target_name_override", self.server_name))
        elif self.token is None:
            return grpc.insecure_channel(target, options=options)
        elif is_loopback(target.rpartition(":")[0]):
            credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        else:
            raise ValueError(f"a token without TLS would cross the network in clear to {target}: set "
                             f"root_cert (TLS), or reach the shard on a loopback address")
        if self.token is not None:  # 'authorization: Bearer <token>', added by gRPC's core per call
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(self.token))
        return grpc.secure_channel(target, credentials, options=options)


def open_channel(target: str, options: tuple = (), security: ClientSecurity | None = None) -> grpc.Channel:
    """grpc.insecure_channel without `security`, else `security.channel`."""
    return grpc.insecure_channel(target, options=options) if security is None else security.channel(target, options)


SCOPES = ("read", "write")


@dataclass(frozen=True)
class NamespaceTokens:
    """The tokens scoped to one namespace: `read_token_digests` may call read-scope rpcs on its
    tables, `write_token_digests` every rpc that names only tables of it (token_digest() each).
    A token listed under several namespaces gets each one's scope there."""

    namespace: str
    read_token_digests: tuple[str, ...] = ()
    write_token_digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or "/" in self.namespace or len(self.namespace) > 255 \
                or not all(" " <= c <= "~" for c in self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be printable ASCII without '/' (a table "
                             f"name's part before its first '/'; '' is the default namespace)")
        for name in ("read_token_digests", "write_token_digests"):
            digests = getattr(self, name)
            if isinstance(digests, str) or not all(_is_digest(d) for d in digests):
                raise ValueError(f"namespace {self.namespace!r}: {name} must be a tuple of sha256 hex "
                                 f"digests (token_digest(token)), not tokens")

    @classmethod
    def from_mapping(cls, scoped: Mapping[str, Mapping[str, Iterable[str]]], digests: bool = False
                     ) -> tuple["NamespaceTokens", ...]:
        """{namespace: {"read": [...], "write": [...]}} of plain tokens (or of their digests, with
        `digests`) as NamespaceTokens, sorted by namespace; ValueError naming a key other than
        read and write."""
        out = []
        for namespace, scopes in sorted(scoped.items()):
            if not isinstance(scopes, Mapping) or set(scopes) - set(SCOPES):
                raise ValueError(f"namespace {namespace!r}: expected a mapping with keys read and/or write, "
                                 f"got {scopes!r}")
            if any(isinstance(scopes.get(s, ()), str) for s in SCOPES):
                raise ValueError(f"namespace {namespace!r}: read and write take lists of tokens")
            read, write = (tuple(t if digests else token_digest(t) for t in scopes.get(s) or ()) for s in SCOPES)
            out.append(cls(namespace, read, write))
        return tuple(out)


@dataclass(frozen=True)
class Caller:
    """Whom a call's token names: `scope` "read" or "write" for a cluster-wide token (None for one
    scoped to namespaces), `namespaces` {namespace: "read" or "write"} of a scoped token, `digest`
    the token's digest ("" without tokens: the caller of an open server)."""

    scope: str | None
    namespaces: Mapping[str, str] = field(default_factory=dict)
    digest: str = ""

    @property
    def is_cluster_wide(self) -> bool:
        return self.scope is not None

    def may(self, namespace: str, scope: str) -> bool:
        """Whether this caller may use `scope` ("read" or "write") on tables of `namespace`."""
        have = self.scope if self.scope is not None else self.namespaces.get(namespace)
        return have == "write" or (have == "read" and scope == "read")


OPEN_CALLER = Caller("write")  # every caller of a server without tokens


@dataclass(frozen=True)
class SecurityConfig:
    """A shard server's TLS and tokens; every field None/empty (the default) serves in the open.

    `cert`, `key`: the server's certificate chain and private key (TLS on). `client_ca`: clients
    must present a certificate signed by it (mutual TLS). `read_token_digests`,
    `write_token_digests`: token_digest() of the accepted tokens (tokens on when either is
    non-empty; `from_tokens` builds them from plain tokens). `namespace_tokens`: tokens scoped to
    namespaces (NamespaceTokens; they turn tokens on too). `peer`: how this shard calls other
    shards (a hot shard's migration exports and imports rows through the cold shards' write rpcs),
    needed when shards of a secured cluster include hot ones.

    The Prometheus endpoint (plain HTTP, counts only): `metrics_host` the interface it binds
    (None: the gRPC server's host; "127.0.0.1" keeps it on the node), `metrics_token_digest`
    token_digest() of the bearer token a scrape must send (None: none asked)."""

    cert: PEM | None = None
    key: PEM | None = field(default=None, repr=False)
    client_ca: PEM | None = None
    read_token_digests: tuple[str, ...] = ()
    write_token_digests: tuple[str, ...] = ()
    peer: ClientSecurity | None = None
    metrics_host: str | None = None
    metrics_token_digest: str | None = None
    namespace_tokens: tuple[NamespaceTokens, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.namespace_tokens, (str, Mapping)) or \
                not all(isinstance(n, NamespaceTokens) for n in self.namespace_tokens):
            raise ValueError("SecurityConfig.namespace_tokens must be a tuple of NamespaceTokens "
                             "(NamespaceTokens.from_mapping builds them)")
        namespaces = [n.namespace for n in self.namespace_tokens]
        if len(set(namespaces)) != len(namespaces):
            raise ValueError(f"SecurityConfig.namespace_tokens names a namespace twice: {sorted(namespaces)}")
        for name in ("cert", "key", "client_ca"):
            _check_pem(getattr(self, name), f"SecurityConfig.{name}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("SecurityConfig: cert and key go together (both or neither)")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("SecurityConfig: client_ca (mutual TLS) needs the server's cert and key")
        for name in ("read_token_digests", "write_token_digests"):
            digests = getattr(self, name)
            if isinstance(digests, str) or not all(_is_digest(d) for d in digests):
                raise ValueError(f"SecurityConfig.{name} must be a tuple of sha256 hex digests "
                                 f"(token_digest(token)), not tokens")
        if self.metrics_token_digest is not None and not _is_digest(self.metrics_token_digest):
            raise ValueError("SecurityConfig.metrics_token_digest must be a sha256 hex digest "
                             "(token_digest(token)), not a token")
        if self.metrics_host is not None and (not isinstance(self.metrics_host, str) or not self.metrics_host):
            raise ValueError(f"SecurityConfig.metrics_host must be a non-empty host, got {self.metrics_host!r}")
        if self.peer is not None and not isinstance(self.peer, ClientSecurity):
            raise ValueError(f"SecurityConfig.peer must be a ClientSecurity, got {type(self.peer).__name__}")

    @classmethod
    def from_tokens(cls, read_tokens=(), write_tokens=(), metrics_token: str | None = None,
                    namespace_tokens: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
                    scoped_digests: tuple[NamespaceTokens, ...] = (), **fields) -> "SecurityConfig":
        """A config accepting these plain tokens (kept as digests only); `namespace_tokens`
        {namespace: {"read": [...], "write": [...]}} the tokens scoped to namespaces, or
        `scoped_digests` those given as digests already (a config file's)."""
        return cls(read_token_digests=tuple(token_digest(t) for t in read_tokens),
                   write_token_digests=tuple(token_digest(t) for t in write_tokens),
                   metrics_token_digest=token_digest(metrics_token) if metrics_token is not None else None,
                   namespace_tokens=NamespaceTokens.from_mapping(namespace_tokens or {}) + tuple(scoped_digests),
                   **fields)

    @property
    def is_tls(self) -> bool:
        return self.cert is not None

    @property
    def is_open(self) -> bool:
        """Neither TLS nor tokens: anyone who reaches the port may call anything."""
        return not self.is_tls and not self.has_tokens

    @property
    def has_tokens(self) -> bool:
        return bool(self.read_token_digests or self.write_token_digests or self.namespace_tokens)

    def token_check(self) -> TokenCheck | None:
        """The server's token check, when tokens are on."""
        return TokenCheck(self.read_token_digests, self.write_token_digests, self.namespace_tokens) \
            if self.has_tokens else None

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Binds `address` on `server`, with TLS when configured; returns the bound port."""
        if not self.is_tls:
            return server.add_insecure_port(address)
        client_ca = read_pem(self.client_ca, "client_ca")
        credentials = grpc.ssl_server_credentials(
            [(read_pem(self.key, "key"), read_pem(self.cert, "cert"))], root_certificates=client_ca,
            require_client_auth=client_ca is not None)
        return server.add_secure_port(address, credentials)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or 'localhost') is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(host: str, security: SecurityConfig | None) -> None:
    """Warns (InsecureBindWarning) when serving `host`, not loopback, without TLS."""
    if is_loopback(host) or (security is not None and security.is_tls):
        return
    tokens = security is not None and security.has_tokens
    warnings.warn(f"serving gRPC on {host} without TLS: anyone who reaches it can read "
                  f"{'the tokens and ' if tokens else ''}every row"
                  f"{'' if tokens else ' and call every rpc (no tokens either)'}; set "
                  f"SecurityConfig(cert=..., key=...) (engram serve --tls-cert/--tls-key)",
                  InsecureBindWarning, stacklevel=3)


# --- the server's token check ---------------------------------------------------------------------

def method_scope(method: str) -> str:
    """'read' or 'write': the scope a full method name ('/package.Service/Method') needs."""
    if method in READ_METHODS or method.startswith(f"/{HEALTH_SERVICE}/"):
        return "read"
    return "write"


class TokenCheck:
    """Checks a call's bearer token against the accepted digests from its headers alone, before
    any of its request is read (server/admission.py asks it first): UNAUTHENTICATED without
    exactly one 'authorization: Bearer <token>' of a known token, PERMISSION_DENIED for a read
    token on a write method (a token scoped to namespaces: one with write on none of them). Which
    tables a scoped token's request may name is server/namespace_check.py's, once it is read."""

    def __init__(self, read_digests: tuple[str, ...], write_digests: tuple[str, ...],
                 namespace_tokens: tuple[NamespaceTokens, ...] = ()) -> None:
        self.read_digests = tuple(d.encode() for d in read_digests)
        self.write_digests = tuple(d.encode() for d in write_digests)
        # (namespace, scope, digest) of every scoped token
        self.scoped = tuple((n.namespace, scope, d.encode()) for n in namespace_tokens
                            for scope in SCOPES for d in getattr(n, f"{scope}_token_digests"))

    def identify(self, metadata) -> Caller | None:
        """The Caller of a call's metadata; None without a valid token."""
        values = [v for k, v in (metadata or ()) if k == METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return None
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.strip().encode()).hexdigest().encode()
        # compare with every digest (no early exit), in constant time each
        write = sum(hmac.compare_digest(digest, d) for d in self.write_digests)
        read = sum(hmac.compare_digest(digest, d) for d in self.read_digests)
        granted = [(namespace, scope) for namespace, scope, d in self.scoped if hmac.compare_digest(digest, d)]
        namespaces: dict[str, str] = {}
        for namespace, scope in granted:  # write wins where a token is listed under both
            namespaces[namespace] = "write" if "write" in (scope, namespaces.get(namespace)) else "read"
        scope = "write" if write else "read" if read else None
        if scope is None and not namespaces:
            return None
        return Caller(scope, namespaces if scope is None else {}, digest.decode())

    def scope_of(self, metadata) -> str | None:
        """'write', 'read' (cluster-wide), 'namespaces' (scoped) or None (no valid token) for a
        call's metadata."""
        found = self.identify(metadata)
        return None if found is None else found.scope or "namespaces"

    def refusal(self, method: str, caller: Caller | None) -> tuple[grpc.StatusCode, str] | None:
        """(status, details) refusing a call of `method` by `caller` (None: no valid token) from
        its headers; None when the call may go on (to the namespace check, for a scoped token)."""
        if caller is None:
            return grpc.StatusCode.UNAUTHENTICATED, status_details(
                f"{method}: missing or invalid token (send metadata '{METADATA_KEY}: Bearer <token>')")
        needs = method_scope(method)
        if caller.is_cluster_wide and not caller.may("", needs):
            return grpc.StatusCode.PERMISSION_DENIED, status_details(
                f"{method} needs a write token; this token has the read scope")
        if not caller.is_cluster_wide and needs == "write" and "write" not in caller.namespaces.values():
            return grpc.StatusCode.PERMISSION_DENIED, status_details(
                f"{method} needs a write token; this token has the read scope on namespaces "
                f"{sorted(caller.namespaces)}")
        return None

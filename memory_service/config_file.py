"""A tables cluster's YAML config file, read into the frozen dataclasses it names.

The file's keys are exactly the fields of `ClusterConfig` (memory_service/cluster.py), with
`storage:` holding `StorageConfig` fields and `security:` the server's TLS files and the
Prometheus endpoint's interface (`TLSFiles`); tokens never sit in the file: they come from
$ENGRAM_READ_TOKENS / $ENGRAM_WRITE_TOKENS (comma-separated) and $ENGRAM_METRICS_TOKEN, as a
Kubernetes Secret sets them. Tokens scoped to namespaces sit in the file as their sha256 digests
only (`security.namespace_tokens: {namespace: {read: [digest, ...], write: [...]}}`, the digest
of a token being `printf %s TOKEN | sha256sum`), and `quotas: {namespace: {max_rows: N,
max_bytes: SIZE}}` limits what each namespace stores. The reader walks `dataclasses.fields`, so a
field added to a config is a key of the file with no change here.

Precedence: the dataclasses' defaults < the file < `overrides` (the command line's flags, in the
same vocabulary). Every mistake is a `ConfigError`, one line naming the file and the key path:
`cluster.yaml: storage.dram_budget: unknown key (did you mean dram_budget_bytes?)`.
`*_bytes` fields take an int or a size with a unit: "8GiB", "512MiB", "4Gi" (binary), "1GB" (decimal).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from memory_service.config import StorageConfig

if TYPE_CHECKING:
    from memory_service.cluster import ClusterConfig
    from memory_service.wire.security import SecurityConfig

READ_TOKENS_VAR, WRITE_TOKENS_VAR = "ENGRAM_READ_TOKENS", "ENGRAM_WRITE_TOKENS"
METRICS_TOKEN_VAR = "ENGRAM_METRICS_TOKEN"  # the bearer token Prometheus scrapes with
# As Kubernetes quantities read: Ki, KiB binary (1024); K, KB decimal (1000)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A config file or flag that cannot become a ClusterConfig; its message is one line."""


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """The `security:` section: PEM files of the shards' server side. `tls_cert`/`tls_key` turn TLS
    on; `tls_ca` is the CA that signed the shards' certificates (what clients and a hot shard's
    migration verify them with; default: `tls_cert` itself, self-signed); `tls_client_ca` makes TLS
    mutual (clients need a certificate it signed). `metrics_host`: the interface the shards'
    Prometheus endpoints bind (default: the shards' host; "127.0.0.1" keeps them on the node)."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_ca: str | None = None
    metrics_host: str | None = None
    namespace_tokens: tuple = ()  # NamespaceTokens: tokens scoped to namespaces, as digests


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with a unit: "8GiB", "8Gi" (binary), "8GB", "8G" (decimal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size (an int, or a number with a unit: 512MiB, 8GiB, 4Gi, 1GB)")
    number, prefix, binary = match.groups()
    scale = (1024 if binary else 1000) ** _POWERS[prefix.upper()] if prefix else 1
    size = float(number) * scale
    if size != int(size):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def load_cluster_config(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> "ClusterConfig":
    """The ClusterConfig of file `path` (None: defaults only) with `overrides` on top; `overrides`
    nests `storage` and `security` as dicts of their fields. Tokens come from `environ`
    (default os.environ). ConfigError on any mistake."""
    from memory_service.cluster import ClusterConfig  # imports Ray: not at the CLI's import

    source = os.fspath(path) if path is not None else None
    fields, tls = read_fields(source, overrides or {})
    # a value's own check cannot tell whether the file or a flag gave it: name both when both spoke
    where = "flags" if source is None else f"{source} with flags" if overrides else source
    security = server_security(tls, os.environ if environ is None else environ, where)
    return _build(ClusterConfig, {**fields, "security": security}, where)


def read_fields(source: str | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], TLSFiles]:
    """The checked ClusterConfig keyword arguments (without security) and the TLS files of file
    `source` merged with `overrides`."""
    from memory_service.cluster import ClusterConfig

    data = _read_yaml(source) if source is not None else {}
    merged = _merge(data, dict(overrides))
    where = source or "flags"
    fields = _convert(ClusterConfig, merged, where, prefix="", skip={"security", "quotas"})
    fields["quotas"] = _quotas(_section(merged, "quotas", where), where)
    security = dict(_section(merged, "security", where))
    scoped = _namespace_tokens(security.pop("namespace_tokens", None), where)
    tls = _build(TLSFiles, {**_convert(TLSFiles, security, where, "security."), "namespace_tokens": scoped}, where)
    storage_fields = _convert(StorageConfig, _section(merged, "storage", where), where, "storage.")
    if storage_fields.get("checkpoint_root"):  # absolute, as `path` below (StorageConfig insists)
        storage_fields["checkpoint_root"] = os.path.abspath(storage_fields["checkpoint_root"])
    storage = _build(StorageConfig, storage_fields, where)
    # absolute: the shards open it in a process Ray starts in a folder of its own
    fields["storage"] = dataclasses.replace(storage, path=os.path.abspath(storage.path)) if storage.path else storage
    return fields, tls


def server_security(tls: TLSFiles, environ: Mapping[str, str], where: str = "flags") -> "SecurityConfig | None":
    """The shards' SecurityConfig from the TLS files and the comma-separated tokens in
    $ENGRAM_READ_TOKENS / $ENGRAM_WRITE_TOKENS, and the Prometheus endpoint's interface and
    $ENGRAM_METRICS_TOKEN; None (open) when none is given. A hot shard
    reaches the cold ones with the first write token, the shard certificate as client certificate
    (mutual TLS) and `tls_ca` (or the certificate itself, when self-signed) as root."""
    from memory_service.wire.security import ClientSecurity, SecurityConfig, read_pem

    read, write = ([t for t in environ.get(var, "").split(",") if t] for var in (READ_TOKENS_VAR, WRITE_TOKENS_VAR))
    metrics_token = environ.get(METRICS_TOKEN_VAR) or None
    if not (tls.tls_cert or tls.tls_key or read or write or tls.metrics_host or metrics_token
            or tls.namespace_tokens):
        return None
    if read and not write:
        raise ConfigError(f"${READ_TOKENS_VAR} without ${WRITE_TOKENS_VAR}: nothing could write, not even the "
                          f"shards' own migration")
    mutual = tls.tls_client_ca is not None
    # read here, by the launcher: the shards run on other nodes, where these files need not exist
    try:
        cert, key, ca, client_ca = (read_pem(getattr(tls, name), f"security.{name}")
                                    for name in ("tls_cert", "tls_key", "tls_ca", "tls_client_ca"))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    try:
        peer = ClientSecurity(root_cert=(ca or cert) if cert else None, token=write[0] if write else None,
                              client_cert=cert if mutual else None, client_key=key if mutual else None) \
            if cert or read or write else None
        return SecurityConfig.from_tokens(read, write, cert=cert, key=key, client_ca=client_ca, peer=peer,
                                          metrics_token=metrics_token, metrics_host=tls.metrics_host,
                                          scoped_digests=tls.namespace_tokens)
    except ValueError as err:
        raise ConfigError(f"{where}: security: {err}") from None


def _quotas(data: dict, where: str) -> tuple:
    """`quotas: {namespace: {max_rows: N, max_bytes: SIZE}}` as NamespaceQuota, sorted by namespace."""
    from memory_service.shard.quotas import NamespaceQuota

    quotas = []
    for namespace, limits in sorted(data.items(), key=lambda item: str(item[0])):
        what = f"{where}: quotas.{namespace}"
        if not isinstance(limits, dict):
            raise ConfigError(f"{what}: expected a mapping with max_rows and/or max_bytes, got {_kind(limits)}")
        if not isinstance(namespace, str):
            raise ConfigError(f"{what}: a namespace is a string")
        fields = _convert(NamespaceQuota, limits, where, f"quotas.{namespace}.", skip={"namespace"})
        quotas.append(_build(NamespaceQuota, {**fields, "namespace": namespace}, where))
    return tuple(quotas)


def _namespace_tokens(data: Any, where: str) -> tuple:
    """`security.namespace_tokens: {namespace: {read: [digest], write: [digest]}}` as NamespaceTokens."""
    from memory_service.wire.security import NamespaceTokens

    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: security.namespace_tokens: expected a mapping of namespaces, got {_kind(data)}")
    try:
        return NamespaceTokens.from_mapping({str(k): v for k, v in data.items()}, digests=True)
    except ValueError as err:
        raise ConfigError(f"{where}: security.namespace_tokens: {err}") from None


def _read_yaml(source: str) -> dict:
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, one level into the nested sections."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping of keys to values, got {_kind(value)}")
    return value


def _convert(cls: type, data: dict, where: str, prefix: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    """`data`'s values checked against `cls`'s field types (nested dataclasses are left to the caller)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where}: {prefix}{key}: unknown key{hint}")
        if key in skip or dataclasses.is_dataclass(hints[key]):
            continue
        out[key] = _value(value, hints[key], key, f"{where}: {prefix}{key}")
    return out


def _value(value: Any, hint: Any, name: str, what: str) -> Any:
    """`value` as type `hint` (int, float, str, bool, or one of them | None), or ConfigError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{what}: must not be null")
    kind = next(t for t in options if t is not type(None))
    if name.endswith("_bytes") and kind is int:
        try:
            return parse_size(value)
        except ValueError as err:
            raise ConfigError(f"{what}: {err}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{what}: expected {kind.__name__}{' or null' if len(options) > 1 else ''}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _build(cls: type, fields: dict, where: str):
    """`cls(**fields)`, its own checks (`__post_init__`) turned into a ConfigError naming `where`."""
    try:
        return cls(**fields)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None

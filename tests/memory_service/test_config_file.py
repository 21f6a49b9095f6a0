"""memory_service.config_file: a YAML file becomes the frozen ClusterConfig it spells, flags override
it, and every mistake is one ConfigError line naming the file and the key path."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from memory_service.config_file import ConfigError, load_cluster_config, parse_size, read_fields
from memory_service.wire.security import ClientSecurity, token_digest

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
name: engram
num_shards: 3
num_hot: 1
hot_rows: 4096
host: 127.0.0.1
port: 50051
metrics_port: null
max_restarts: -1
migrate_max_duty: 0.1
storage:
  path: /var/lib/engram/tables
  dram_budget_bytes: 4GiB
  wal: true
"""


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(path: Path, overrides: dict | None = None, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(path, overrides, environ={} if environ is None else environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_good_file_becomes_the_config_it_spells(tmp_path):
    config = load_cluster_config(write(tmp_path, GOOD), environ={})
    assert (config.name, config.num_shards, config.num_hot, config.hot_rows) == ("engram", 3, 1, 4096)
    assert (config.port, config.metrics_port, config.max_restarts, config.migrate_max_duty) == (50051, None, -1, 0.1)
    assert config.storage.path == "/var/lib/engram/tables" and config.storage.dram_budget_bytes == 4 << 30
    assert config.storage.wal and config.security is None
    assert config.placement == "engram" and config.storage.policy == "recent"  # defaults where the file is silent


def test_the_shipped_config_loads(tmp_path):
    """deploy/base/cluster.yaml (the ConfigMap engram serve reads in the manifests)."""
    config = load_cluster_config(ROOT / "deploy" / "base" / "cluster.yaml", environ={})
    assert config.detached and config.ready_timeout_s == 300 and config.storage.dram_budget_bytes == 48 << 30


def test_flags_override_the_file_and_defaults_fill_the_rest(tmp_path):
    path = write(tmp_path, GOOD)
    config = load_cluster_config(path, {"num_shards": 5, "storage": {"dram_budget_bytes": "512MiB"}}, environ={})
    assert config.num_shards == 5 and config.storage.dram_budget_bytes == 512 << 20
    assert config.storage.path == "/var/lib/engram/tables" and config.num_hot == 1  # the file's, kept
    assert load_cluster_config(None, {"num_shards": 1}, environ={}).storage.path is None  # no file: defaults


@pytest.mark.parametrize("text, expected", [
    ("num_shard: 2", "cluster.yaml: num_shard: unknown key (did you mean num_shards?)"),
    ("storage:\n  dram_budget: 8GiB", "cluster.yaml: storage.dram_budget: unknown key (did you mean dram_budget_bytes?)"),
    ("security:\n  tls_crt: a.pem", "cluster.yaml: security.tls_crt: unknown key (did you mean tls_cert?)"),
    ("security:\n  read_tokens: abc", "cluster.yaml: security.read_tokens: unknown key"),  # tokens never in the file
    ("num_shards: two", "cluster.yaml: num_shards: expected int, got str 'two'"),
    ("num_shards: true", "cluster.yaml: num_shards: expected int, got bool True"),
    ("host: null", "cluster.yaml: host: must not be null"),
    ("storage: 3", "cluster.yaml: storage: expected a mapping of keys to values, got int 3"),
    ("storage:\n  dram_budget_bytes: lots", "cluster.yaml: storage.dram_budget_bytes: 'lots' is not a size"),
    ("num_shards: 0", "cluster.yaml: num_shards 0 must be in [1, 4096]"),  # the dataclass's own check
    ("- a list", "cluster.yaml: must be a mapping of keys to values, got list"),
    ("name: [unclosed", "cluster.yaml: not valid YAML (line 1): expected ',' or ']'"),
])
def test_a_mistake_is_one_line_naming_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error(path).startswith(expected.replace("cluster.yaml", str(path)))


def test_a_missing_file_and_a_bad_flag_are_named(tmp_path):
    assert error(tmp_path / "nope.yaml").startswith(f"{tmp_path / 'nope.yaml'}: cannot read: No such file")
    path = write(tmp_path, GOOD)
    assert error(path, {"num_shards": 0}) == f"{path} with flags: num_shards 0 must be in [1, 4096]"
    assert error(None, {"port": 70000}).startswith("flags: port 70000 with 2 shards exceeds 65535")


def test_sizes_take_binary_and_decimal_units():
    assert [parse_size(s) for s in ("8GiB", "8Gi", "512MiB", "1.5KiB", "1GB", "1G", "100B", "12")] == \
        [8 << 30, 8 << 30, 512 << 20, 1536, 10**9, 10**9, 100, 12]
    assert parse_size(4096) == 4096
    for bad in ("x", "1.3B", "GiB", "-1GiB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_tls_from_the_file_and_tokens_only_from_the_environment(tmp_path):
    """The launcher reads the PEM files and ships their bytes: shards on other nodes need not
    have them; a missing one is a ConfigError naming the key."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tls_dir / name).write_bytes(f"PEM of {name}".encode())
    path = write(tmp_path, GOOD + f"security:\n  tls_cert: {tls_dir}/tls.crt\n  tls_key: {tls_dir}/tls.key\n"
                                  f"  tls_ca: {tls_dir}/ca.crt\n")
    env = {"ENGRAM_READ_TOKENS": "r1,r2", "ENGRAM_WRITE_TOKENS": "w1"}
    security = load_cluster_config(path, environ=env).security
    assert (security.cert, security.key) == (b"PEM of tls.crt", b"PEM of tls.key")
    assert security.read_token_digests == (token_digest("r1"), token_digest("r2"))
    assert security.peer == ClientSecurity(root_cert=b"PEM of ca.crt", token="w1")  # migration reaches cold shards
    _, tls = read_fields(str(path), {"security": {"tls_ca": "/other/ca.crt"}})
    assert tls.tls_ca == "/other/ca.crt" and tls.tls_cert == f"{tls_dir}/tls.crt"
    assert error(path, overrides={"security": {"tls_ca": "/other/ca.crt"}}) == \
        f"{path} with flags: security.tls_ca: cannot read PEM file '/other/ca.crt': No such file or directory"
    assert "ENGRAM_READ_TOKENS without $ENGRAM_WRITE_TOKENS" in error(path, environ={"ENGRAM_READ_TOKENS": "r"})
    half = write(tmp_path, f"security:\n  tls_cert: {tls_dir}/tls.crt\n", "half.yaml")
    assert error(half) == f"{half}: security: SecurityConfig: cert and key go together (both or neither)"


def test_a_relative_storage_path_is_made_absolute_by_the_launcher(tmp_path, monkeypatch):
    """Shards open it in processes Ray starts in folders of its own, where a relative path
    names another directory."""
    monkeypatch.chdir(tmp_path)
    config = load_cluster_config(None, {"storage": {"path": "tables"}}, environ={})
    assert config.storage.path == str(tmp_path / "tables")


def test_the_checkpoint_root_defaults_under_the_storage_path_and_is_made_absolute(tmp_path, monkeypatch):
    """storage.checkpoint_root: absolute like the path; default <path>/checkpoints, kept by every
    shard's own config (not moved into its shard-NNNN folder); none for an all-DRAM cluster."""
    monkeypatch.chdir(tmp_path)
    config = load_cluster_config(None, {"storage": {"path": "tables"}}, environ={})
    assert config.storage.checkpoint_dir == str(tmp_path / "tables" / "checkpoints")
    assert config.storage.for_shard(1).checkpoint_dir == str(tmp_path / "tables" / "checkpoints")
    config = load_cluster_config(None, {"storage": {"path": "tables", "checkpoint_root": "ck"}}, environ={})
    assert config.storage.checkpoint_dir == str(tmp_path / "ck") == config.storage.for_shard(0).checkpoint_dir
    assert load_cluster_config(None, {}, environ={}).storage.checkpoint_dir is None

"""Quotas and tokens scoped to namespaces in the config file and `engram serve`'s flags: read into
ClusterConfig.quotas and SecurityConfig.namespace_tokens, flags over the file, mistakes one line."""
from __future__ import annotations

import argparse

import pytest

from memory_service.config_file import ConfigError, load_cluster_config
from memory_service.shard.quotas import NamespaceQuota
from memory_service.wire.security import NamespaceTokens, token_digest
from trainer.cli import serving

DIGEST = token_digest("runa-token")


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serving.add_parsers(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_the_file_sets_quotas_and_scoped_token_digests(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"quotas:\n  runa: {{max_rows: 1000, max_bytes: 1MiB}}\n  '': {{max_rows: 5}}\n"
                    f"security:\n  namespace_tokens:\n    runa: {{write: [{DIGEST}]}}\n")
    config = load_cluster_config(str(path), environ={})
    assert config.quotas == (NamespaceQuota("", max_rows=5), NamespaceQuota("runa", 1000, 1 << 20))
    assert config.security.namespace_tokens == (NamespaceTokens("runa", (), (DIGEST,)),)
    assert config.security.has_tokens


def test_serve_flags_override_the_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("quotas:\n  runa: {max_rows: 1000}\n  runb: {max_rows: 7}\n")
    args = _serve_args("--quota-rows", "runa=10", "--quota-bytes", "runa=2KiB",
                       "--namespace-token", f"runb=read:{DIGEST}")
    config = load_cluster_config(str(path), serving.serve_overrides(args), environ={})
    assert config.quotas == (NamespaceQuota("runa", 10, 2048), NamespaceQuota("runb", max_rows=7))
    assert config.security.namespace_tokens == (NamespaceTokens("runb", (DIGEST,), ()),)


@pytest.mark.parametrize("text,message", [
    ("quotas:\n  runa: {max_rowz: 1}\n", "quotas.runa.max_rowz: unknown key (did you mean max_rows?)"),
    ("quotas:\n  runa: {max_rows: -1}\n", "max_rows must be an int >= 0"),
    ("quotas:\n  runa: {}\n", "sets neither"),
    ("quotas:\n  a/b: {max_rows: 1}\n", "without '/'"),
    ("security:\n  namespace_tokens:\n    runa: {write: [plain-token]}\n", "sha256 hex digests"),
    ("security:\n  namespace_tokens:\n    runa: {admin: []}\n", "read and/or write"),
])
def test_mistakes_are_one_line(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_cluster_config(str(path), environ={})


def test_bad_flags_are_usage_errors(capsys):
    for argv in (["--quota-rows", "runa"], ["--namespace-token", "runa=admin:x"], ["--quota-rows", "a/b=1"]):
        with pytest.raises(SystemExit):
            _serve_args(*argv)

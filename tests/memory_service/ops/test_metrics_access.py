"""Who may read a shard's Prometheus endpoint: it binds the interface SecurityConfig.metrics_host
names (not the gRPC server's), and with a metrics token answers only scrapes that send it (401
otherwise). A real shard server and HTTP over loopback: 127.0.0.2 stands for a private interface
(Linux routes all of 127/8 to lo)."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from memory_service.config_file import TLSFiles, server_security
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.wire.security import SecurityConfig, token_digest

TOKEN = "scrape-token-89"


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


@pytest.fixture(scope="module")
def server():
    server = serve(Shard(0, 1), metrics_port=0, security=SecurityConfig.from_tokens(
        metrics_token=TOKEN, metrics_host="127.0.0.2"))
    yield server
    server.stop(None)


def test_the_endpoint_binds_the_chosen_interface_only(server):
    assert server.host == "127.0.0.1" and server.metrics.server.server_address[0] == "127.0.0.2"
    with pytest.raises(urllib.error.URLError):  # nothing listens on the gRPC server's interface
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5)


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"], ids=["none", "wrong", "prefix"])
def test_a_scrape_without_the_token_is_401(server, token):
    assert _get(f"http://127.0.0.2:{server.metrics.port}/metrics", token) == (401, "")


def test_a_scrape_with_the_token_reads_the_metrics(server):
    status, text = _get(f"http://127.0.0.2:{server.metrics.port}/metrics", TOKEN)
    assert status == 200 and "engram_shard_uptime_seconds" in text


def test_the_config_file_sets_them():
    security = server_security(TLSFiles(metrics_host="127.0.0.1"), {"ENGRAM_METRICS_TOKEN": TOKEN})
    assert security.metrics_host == "127.0.0.1" and security.metrics_token_digest == token_digest(TOKEN)
    assert security.is_open and security.peer is None  # gRPC stays as it was: open
    assert server_security(TLSFiles(), {}) is None

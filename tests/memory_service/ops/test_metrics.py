"""Prometheus: a live shard's endpoint scraped over HTTP and parsed with prometheus_client's text
parser; every metric documented in deploy/README.md is there, named and labelled by Prometheus
conventions, with values that agree with the Stats rpc."""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from memory_service.config import TableConfig
from memory_service.ops.metrics import METRICS

README = Path(__file__).resolve().parents[3] / "deploy" / "README.md"
ROW = re.compile(r"^\| `(engram_[a-z0-9_]+)` \| (gauge|counter|histogram) \| ([^|]*) \|")


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """deploy/README.md's metrics table: full name -> (type, labels beyond cluster and shard)."""
    rows = {}
    for line in README.read_text().splitlines():
        if m := ROW.match(line):
            labels = tuple(x.strip() for x in m[3].split(",") if x.strip() not in ("", "-"))
            rows[m[1]] = (m[2], labels)
    return rows


def scrape(host: str, port: int) -> dict:
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family, name: str, **labels) -> list:
    return [s for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_readme_documents_every_exported_family():
    exported = {name + ("_total" if kind == "counter" else ""): (kind, labels)
                for name, kind, labels, _ in METRICS}
    assert documented() == exported


def test_scrape_live_shards(make_cluster):
    cluster = make_cluster(2)
    with cluster.client() as client:
        client.create_table(TableConfig(name="plain", num_rows=100, width=4))
        client.create_table(TableConfig(name="sampled", num_rows=100, width=4, collision_sample_rate=1.0))
        ids = np.array([1, 2, 3, 4, 5, 1])
        fps = np.array([7, 8, 9, 10, 11, 12], dtype=np.uint64)  # id 1: two N-grams (7 and 12)
        for step in (1, 2):
            client.fetch({"plain": ids, "sampled": ids}, ngrams={"sampled": fps})
            client.push({"plain": (ids, np.ones((6, 4), np.float32))}, step=step)
        report = client.report()
    docs = documented()
    for address, shard in zip(cluster.addresses, report.shards):
        assert address.metrics_port == shard.metrics_port > 0
        families = scrape(address.host, address.metrics_port)
        for full_name, (kind, labels) in docs.items():
            family_name = full_name.removesuffix("_total") if kind == "counter" else full_name
            assert family_name in families, f"{full_name} missing from shard {shard.shard_id}"
            family = families[family_name]
            assert family.type == kind and family.samples, full_name
            for s in family.samples:  # conventions: namespace, base-unit suffixes, identity labels
                assert re.fullmatch(r"engram_[a-z0-9_]+", s.name)
                assert s.labels["cluster"] == cluster.config.name
                assert (s.labels["role"], s.labels["shard"]) == (shard.role, str(shard.shard_id))
                assert set(labels) <= set(s.labels)
                if kind == "counter":
                    assert s.name.endswith(("_total", "_created"))
        c = shard.counters
        req = families["engram_rpc_requests"]
        assert samples(req, "engram_rpc_requests_total", rpc="fetch")[0].value == c.fetch_requests == 2
        assert samples(req, "engram_rpc_requests_total", rpc="push")[0].value == c.push_requests == 2
        rows = families["engram_rpc_rows"]
        assert samples(rows, "engram_rpc_rows_total", rpc="push")[0].value == c.push_rows
        hist = families["engram_rpc_duration_seconds"]
        count = samples(hist, "engram_rpc_duration_seconds_count", rpc="fetch")[0].value
        buckets = [s.value for s in samples(hist, "engram_rpc_duration_seconds_bucket", rpc="fetch")]
        assert count == c.fetch_requests and buckets == sorted(buckets) and buckets[-1] == count
        usage = {t.name: t for t in shard.tables}
        table_rows = families["engram_table_rows"]
        for name in ("plain", "sampled"):
            value = samples(table_rows, "engram_table_rows", table=name, tier="dram")[0].value
            assert value == usage[name].rows
        lookups = families["engram_table_ngram_lookups"]
        assert samples(lookups, "engram_table_ngram_lookups_total", table="sampled")[0].value == \
            usage["sampled"].collisions.lookups
        assert not samples(lookups, "engram_table_ngram_lookups_total", table="plain")  # stats off
    # shard 1 holds the odd ids: id 1 looked up by two N-grams in each fetch
    odd = {t.name: t for t in report.shards[1].tables}["sampled"].collisions
    assert (odd.lookups, odd.colliding_lookups) == (8, 4)


def test_no_endpoint_when_disabled(ray_session):
    """metrics_port None: the shard serves no Prometheus endpoint and reports port 0."""
    from memory_service.cluster import ClusterConfig, launch

    cluster = launch(ClusterConfig(num_shards=1, name="no-metrics", metrics_port=None))
    try:
        assert cluster.addresses[0].metrics_port == 0
        with cluster.client() as client:
            assert client.report().shards[0].metrics_port == 0
    finally:
        cluster.shutdown()

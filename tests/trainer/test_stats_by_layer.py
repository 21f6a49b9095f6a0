"""`engram stats --by layer,order,head` after a training run through the service: every group's
rows read, reads, distinct rows per step and hits per tier equal counts this test takes itself
from the same batches (the run's row ids, hashed again here), so the labels, the shards' counters
(direct reads included) and the grouping agree with what the trainer really read."""
import json
from dataclasses import replace

import numpy as np
import pytest

from trainer.cli import main
from trainer.data import Batches, Corpus, eval_batches
from trainer.remote_tables import table_labels
from trainer.train import ServiceOptions, build, train

from tests.trainer.test_train import small_train_config

pytestmark = pytest.mark.slow


def expected_counts(cfg, corpus) -> dict[tuple[str, str, str], dict[str, int]]:
    """(layer, order, head) -> rows read, reads, arena hits and computed rows, from the run's own
    batches: a training step reads each distinct row of its batch once (after the previous step's
    push wrote the rows it read), the final evaluation reads its batches without pushing."""
    _, indexer, _ = build(cfg, corpus)
    batches = Batches(corpus.train, cfg.batch_size, cfg.model.context, seed=cfg.seed)
    reads = [(indexer(batches.next()[0]), True) for _ in range(cfg.steps)]
    reads += [(indexer(x), False) for x, _ in eval_batches(corpus.val, cfg.batch_size, cfg.model.context,
                                                            cfg.eval_batches)]
    out, written = {}, {}
    for ids, pushed in reads:
        for layer, layer_ids in ids.items():  # (B, T, H)
            for h in range(layer_ids.shape[-1]):
                labels = table_labels(cfg.model.engram, layer, h)
                key = (labels["layer"], labels["order"], labels["head"])
                rows = np.unique(layer_ids[..., h].numpy())
                seen = written.setdefault(key, set())
                hits = sum(int(r) in seen for r in rows)
                count = out.setdefault(key, {"rows_read": 0, "reads": 0, "hits": 0, "computed": 0})
                count["rows_read"] += len(rows)
                count["reads"] += 1
                count["hits"] += hits
                count["computed"] += len(rows) - hits
                if pushed:
                    seen.update(int(r) for r in rows)
    return out


def test_stats_by_layer_order_and_head_match_the_runs_own_counts(make_cluster, corpus_dir, tmp_path, capsys):
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=6, warmup_steps=1, threads=1)
    corpus = Corpus.load(cfg.corpus)
    cluster = make_cluster(2)
    with cluster.client() as client:
        train(cfg, corpus, client=client, service=ServiceOptions(prefix="bylayer"))
        client.stats()  # sends this client's pending direct-read reports
    want = expected_counts(cfg, corpus)

    assert main(["stats", "--targets", ",".join(cluster.targets), "--by", "layer,order,head", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {(g["key"]["layer"], g["key"]["order"], g["key"]["head"]): g for g in report["groups"]}
    assert set(groups) == set(want) and len(want) == 4  # 1 layer x orders 2, 3 x 2 heads
    for key, count in want.items():
        g = groups[key]
        assert g["tables"] == 1
        assert (g["rows_read"], g["tier_hits"].get("dram", 0), g["computed"]) == (
            count["rows_read"], count["hits"], count["computed"]), key
        assert g["distinct_rows_per_read"] == pytest.approx(count["rows_read"] / count["reads"]), key
        assert g["hot_rows_read"] == 0 and g["collision_share"] is None  # no hot shards, no sampling
    tables = {t["name"]: t for t in report["tables"]}
    assert all(t["reads"] == cfg.steps + cfg.eval_batches for t in tables.values())

    # Grouped by order alone, each row sums its heads.
    assert main(["stats", "--targets", ",".join(cluster.targets), "--by", "order", "--json"]) == 0
    by_order = {g["key"]["order"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    for order in ("2", "3"):
        assert by_order[order]["rows_read"] == sum(c["rows_read"] for k, c in want.items() if k[1] == order)
        assert by_order[order]["tables"] == 2

    # The terminal view has the grouped table too.
    assert main(["stats", "--targets", ",".join(cluster.targets), "--by", "layer,order"]) == 0
    assert "tables by layer, order" in capsys.readouterr().out

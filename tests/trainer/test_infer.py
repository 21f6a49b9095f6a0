"""Incremental generation: the decode cache reproduces the full forward, incremental row ids the
full hash, `generate` the naive loop; prefetch precedes each forward; `engram generate` end to end."""

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.engram import EngramConfig, LocalTables
from trainer.infer import generate, load_checkpoint
from trainer.model import EngramLM, ModelConfig
from trainer.row_indexer import RowIndexer, identity_compression
from trainer.tokenizer_compression import TokenizerCompression

VOCAB, CONTEXT = 97, 40


class LoggingTables(LocalTables):
    """Real in-process tables that record every prefetch and lookup, in call order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []

    def prefetch(self, row_ids: dict[int, torch.Tensor]) -> None:
        self.log.append(("prefetch", {layer: ids.clone() for layer, ids in row_ids.items()}))

    def lookup(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        self.log.append(("lookup", layer, row_ids.clone()))
        return super().lookup(layer, row_ids)


def small_model(engram: bool = True, tables_class: type[LocalTables] = LocalTables):
    """Two branches, Engram at layers 0 and 2 (conv reach 3 * 3 = 9 positions, trigrams), every
    weight perturbed: at init the conv is zero and the branches equal, which would hide errors."""
    e = EngramConfig(hidden_size=32, num_branches=2, max_ngram=3, heads_per_ngram=2, d_mem=16,
                     table_sizes=(101, 103), layer_ids=(0, 2), init_scale=0.1)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, mlp_hidden=64,
                      context=CONTEXT, num_branches=2, engram=e if engram else None)
    indexer = RowIndexer(e, identity_compression(VOCAB), raw_pad_id=0) if engram else None
    tables = tables_class(e, indexer.table_sizes()) if engram else None
    model = EngramLM(cfg, tables, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, indexer


def random_tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def full_logits(model, indexer, x):
    return model(x, indexer(x) if indexer else None)  # (B, T, V)


def naive_greedy(model, indexer, prompt, max_new_tokens):
    """Re-runs the full forward over the whole sequence for every new token."""
    seq = prompt
    for _ in range(max_new_tokens):
        seq = torch.cat([seq, full_logits(model, indexer, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# a prompt, single tokens until the conv's window (9) and the trigram (2) reach past it, a chunk of
# several tokens into a non-empty cache (the causal mask), more single tokens, a final chunk
CHUNKS = [5] + [1] * 14 + [4] + [1] * 3 + [3]


@pytest.mark.parametrize("engram", [True, False], ids=["engram", "baseline"])
@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(engram):
    model, indexer = small_model(engram)
    x = random_tokens(B=3, T=sum(CHUNKS))
    cache = model.new_cache(3, sum(CHUNKS), indexer.initial_recent_ids(3) if engram else None)
    steps, start = [], 0
    for size in CHUNKS:
        tokens, row_ids = x[:, start:start + size], None
        if engram:
            row_ids, cache.recent_ids = indexer.extend(cache.recent_ids, tokens)
        steps.append(model(tokens, row_ids, cache))
        start += size
    expected = full_logits(model, indexer, x)
    assert cache.position == x.shape[1]
    assert expected.abs().max() > 0.5  # not trivially small
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_ngram", [2, 3, 4])
def test_extend_row_ids_equal_the_full_hash(max_ngram):
    # A compression that merges ids and moves the pad: raw pad 5 -> canonical lookup[5]
    canonical = np.random.default_rng(0).integers(0, 30, VOCAB)
    _, lookup = np.unique(canonical, return_inverse=True)
    compression = TokenizerCompression(lookup=lookup.astype(np.int64), num_canonical=int(lookup.max()) + 1)
    e = EngramConfig(hidden_size=32, num_branches=1, max_ngram=max_ngram, heads_per_ngram=3, d_mem=12,
                     table_sizes=(211,) * (max_ngram - 1), layer_ids=(1, 4))
    indexer = RowIndexer(e, compression, raw_pad_id=5)
    assert compression.map_pad(5) != 0
    x = random_tokens(B=2, T=20, seed=3)
    expected = indexer(x)
    recent, start = indexer.initial_recent_ids(2), 0
    for size in [1, 1, 2, 1, 5, 3, 1, 6]:  # chunks shorter and longer than max_ngram - 1
        rows, recent = indexer.extend(recent, x[:, start:start + size])
        start += size
        assert rows.keys() == expected.keys()
        for layer, ids in rows.items():
            assert torch.equal(ids, expected[layer][:, start - size:start])
        assert torch.equal(recent[:, max(0, max_ngram - 1 - start):],
                           compression.compress_torch(x[:, max(0, start - max_ngram + 1):start]))
    assert start == x.shape[1]


@pytest.mark.parametrize("engram", [True, False], ids=["engram", "baseline"])
def test_greedy_generate_equals_rerunning_the_full_forward(engram):
    model, indexer = small_model(engram)
    prompt = random_tokens(B=2, T=6, seed=4)
    out = generate(model, indexer, prompt, max_new_tokens=20)
    with torch.no_grad():
        assert torch.equal(out, naive_greedy(model, indexer, prompt, 20))
    assert out.shape == (2, 26)


def test_top_k_sampling_is_reproducible_and_picks_only_among_the_top_k():
    model, indexer = small_model()
    prompt = random_tokens(B=3, T=4, seed=5)

    def sample(seed: int, top_k: int = 5) -> torch.Tensor:
        return generate(model, indexer, prompt, 16, top_k=top_k, temperature=2.0, seed=seed)

    out = sample(seed=1)
    assert torch.equal(out, sample(seed=1))
    assert not torch.equal(out, sample(seed=2))
    assert torch.equal(sample(seed=7, top_k=1), generate(model, indexer, prompt, 16))  # top 1 = greedy
    with torch.no_grad():
        logits = full_logits(model, indexer, out[:, :-1])[:, 3:]  # (B, 16, V): what picked each new token
    top5 = logits.topk(5, dim=-1).indices  # (B, 16, 5)
    assert (top5 == out[:, 4:, None]).any(-1).all()
    assert not (logits.argmax(-1) == out[:, 4:]).all()  # it does sample, not only take the argmax


def test_prefetch_precedes_each_forward_with_the_row_ids_it_reads():
    model, indexer = small_model(tables_class=LoggingTables)
    out = generate(model, indexer, random_tokens(B=2, T=5, seed=6), max_new_tokens=4)
    full = indexer(out)
    spans = [(0, 5), (5, 6), (6, 7), (7, 8)]  # the prefill, then one forward per fed-back token
    log = model.tables.log
    assert len(log) == 3 * len(spans)  # per forward: one prefetch, then a lookup per Engram layer
    for i, (start, end) in enumerate(spans):
        (kind, prefetched), *lookups = log[3 * i:3 * i + 3]
        assert kind == "prefetch" and prefetched.keys() == {0, 2}
        for layer, ids in prefetched.items():
            assert torch.equal(ids, full[layer][:, start:end])
        assert [(kind, layer) for kind, layer, _ in lookups] == [("lookup", 0), ("lookup", 2)]
        for _, layer, ids in lookups:
            assert torch.equal(ids, prefetched[layer])


@torch.no_grad()
def test_exceeding_the_context_or_the_cache_raises():
    model, indexer = small_model()
    prompt = random_tokens(B=1, T=30)
    with pytest.raises(ValueError, match="prompt of 30 tokens \\+ max_new_tokens 11 = 41 exceeds the context 40"):
        generate(model, indexer, prompt, max_new_tokens=11)
    cache = model.new_cache(1, recent_ids=indexer.initial_recent_ids(1))
    row_ids, cache.recent_ids = indexer.extend(cache.recent_ids, prompt)
    model(prompt, row_ids, cache)
    more = prompt[:, :11]
    with pytest.raises(ValueError, match="sequence length 41 exceeds the context 40 \\(30 cached \\+ 11 new\\)"):
        model(more, indexer.extend(cache.recent_ids, more)[0], cache)
    small = model.new_cache(1, capacity=4, recent_ids=indexer.initial_recent_ids(1))
    with pytest.raises(ValueError, match="0 cached \\+ 5 new tokens exceed the cache's capacity 4"):
        model(prompt[:, :5], indexer(prompt[:, :5]), small)
    with pytest.raises(ValueError, match="cache capacity 41 must be in \\[1, context 40\\]"):
        model.new_cache(1, capacity=41, recent_ids=indexer.initial_recent_ids(1))


def test_bad_generate_arguments_name_the_value():
    model, indexer = small_model()
    prompt = random_tokens(B=1, T=3)
    for kwargs, message in [(dict(top_k=98), "top_k 98 must be in \\[0, vocab_size 97\\]"),
                            (dict(temperature=0.0), "temperature 0.0 must be > 0"),
                            (dict(max_new_tokens=-1), "max_new_tokens -1 must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            generate(model, indexer, prompt, **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="needs its row indexer"):
        generate(model, None, prompt, 2)
    with pytest.raises(ValueError, match="prompt must be \\(B, P\\) int64"):
        generate(model, indexer, prompt[:, :0], 2)


@pytest.mark.parametrize("baseline", [False, True], ids=["engram", "baseline"])
def test_cli_generate_from_a_train_local_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys, baseline):
    monkeypatch.setenv("HOME", str(tmp_path))  # the corpus cache goes under ~/.cache: keep it here
    ckpt = tmp_path / "model.pt"
    assert main(["train-local", "--corpus", str(corpus_dir), "--steps", "2", "--batch-size", "2",
                 "--context", "32", "--checkpoint", str(ckpt)] + ["--no-engram"] * baseline) == 0
    capsys.readouterr()
    prompt = "def main(args):\n    return"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--max-new-tokens", "8",
                 "--top-k", "5", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(prompt) and len(text) > len(prompt) + 1
    model, indexer, cfg, _ = load_checkpoint(ckpt)
    assert (indexer is None) == baseline and cfg.model.context == 32
    saved = torch.load(ckpt, weights_only=False)["model"]
    assert all(torch.equal(t, saved[name]) for name, t in model.state_dict().items())

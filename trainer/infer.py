"""Generation from a trained EngramLM: one forward over the prompt fills a DecodeCache, then one
forward per new token continues it.

Each forward's row ids are known from its tokens alone, so they are announced to the tables
(`EngramTables.prefetch`) before that forward starts: tables that live elsewhere fetch while the
blocks before the first Engram layer compute (ENGRAM.md §6). `load_checkpoint` rebuilds what
trainer/train.py saved; its `make_tables` is where such tables replace the in-process ones.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from trainer.data import Corpus, CorpusConfig
from trainer.decode_cache import DecodeCache
from trainer.engram import EngramConfig, EngramTables, LocalTables
from trainer.model import EngramLM, ModelConfig
from trainer.remote_tables import RemoteTables
from memory_service.config import OptimizerConfig
from trainer.row_indexer import RowIndexer
from trainer.train import TablesFactory, TrainConfig, build_indexer, check_device



@torch.no_grad()  # not inference_mode: its output could not feed a later training forward
def generate(model: EngramLM, indexer: RowIndexer | None, prompt: torch.Tensor, max_new_tokens: int,
             top_k: int = 0, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """prompt (B, P) raw int64 ids -> (B, P + max_new_tokens): the prompt and its continuation.

    top_k 0 takes the most likely token (greedy); top_k > 0 samples among the k most likely from
    softmax(logits / temperature), drawn from a generator seeded with `seed`, so a seed repeats
    its tokens. `indexer` is None for a baseline (no Engram). The whole sequence must fit the
    model's context. Runs on the model's device (the prompt is moved there; so is the result):
    row ids are hashed there too, so on a GPU only the rows of remote tables cross the bus.
    """
    check_generate_args(model, indexer, prompt, max_new_tokens, top_k, temperature)
    prompt = prompt.to(model.embed.weight.device)
    B, P = prompt.shape
    recent_ids = indexer.initial_recent_ids(B, prompt.device) if indexer is not None else None
    cache = model.new_cache(B, P + max_new_tokens, recent_ids)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    tokens, new = [prompt], prompt
    for _ in range(max_new_tokens):  # the last token picked is never fed back
        logits = decode_step(model, indexer, cache, new)  # (B, T, V): T = P first, then 1
        new = pick(logits[:, -1], top_k, temperature, generator)[:, None]  # (B, 1)
        tokens.append(new)
    return torch.cat(tokens, dim=1)  # (B, P + max_new_tokens)


def decode_step(model: EngramLM, indexer: RowIndexer | None, cache: DecodeCache,
                tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of `tokens` (B, T) appended to the cached sequences. Their row ids go to
    `tables.prefetch` first, then the forward starts: the order remote tables rely on."""
    row_ids = None
    if indexer is not None:
        row_ids, cache.recent_ids = indexer.extend(cache.recent_ids, tokens)  # {layer: (B, T, H)}
        model.tables.prefetch(row_ids)
    return model(tokens, row_ids, cache)


def pick(logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): the argmax for top_k 0, else a sample among the top k."""
    if top_k == 0:
        return logits.argmax(dim=-1)
    top, ids = torch.topk(logits.float() / temperature, top_k, dim=-1)  # (B, k)
    choice = torch.multinomial(F.softmax(top, dim=-1), 1, generator=generator)  # (B, 1)
    return ids.gather(-1, choice).squeeze(-1)


def check_generate_args(model: EngramLM, indexer: RowIndexer | None, prompt: torch.Tensor,
                        max_new_tokens: int, top_k: int, temperature: float) -> None:
    """Raises ValueError naming the bad argument and its bound."""
    if (indexer is None) != (model.tables is None):
        raise ValueError("an Engram model needs its row indexer and a baseline takes none")
    if prompt.dtype != torch.int64 or prompt.dim() != 2 or 0 in prompt.shape:
        raise ValueError(f"prompt must be (B, P) int64 with B, P >= 1, got {prompt.dtype} {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
    length, context = prompt.shape[1] + max_new_tokens, model.cfg.context
    if length > context:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens + max_new_tokens {max_new_tokens} = {length} "
                         f"exceeds the context {context}")
    if not 0 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k {top_k} must be in [0, vocab_size {model.cfg.vocab_size}]")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")


def generate_text(model: EngramLM, indexer: RowIndexer | None, tokenizer: Tokenizer, prompt: str,
                  max_new_tokens: int, top_k: int = 0, temperature: float = 1.0, seed: int = 0) -> str:
    """`generate` on text: the prompt and its continuation, decoded."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    tokens = torch.tensor([ids], dtype=torch.int64, device=model.embed.weight.device)  # (1, P)
    out = generate(model, indexer, tokens, max_new_tokens, top_k, temperature, seed)  # (1, P + new)
    return tokenizer.decode(out[0].tolist())


def service_tables(client, prefix: str) -> TablesFactory:
    """Read-only tables of a model trained through the table service, attached by name: the
    generation never pushes."""
    def make(cfg: EngramConfig, sizes: dict[int, list[int]]) -> EngramTables:
        return RemoteTables(client, cfg, sizes, OptimizerConfig(), prefix=prefix, read_only=True).attach()
    return make


def checkpoint_tables(cfg: EngramConfig, sizes: dict[int, list[int]]) -> EngramTables:
    """In-process tables whose rows the checkpoint fills, so no initial rows are computed."""
    return LocalTables(cfg, sizes, initialize_rows=False)


def load_checkpoint(path: str | Path, make_tables: TablesFactory = checkpoint_tables, device: str = "cpu"
                    ) -> tuple[EngramLM, RowIndexer | None, TrainConfig, Corpus]:
    """The model a trainer/train.py checkpoint holds, on `device` ("cpu" or "cuda"), its row
    indexer (None for a baseline), its TrainConfig, and its corpus (for the tokenizer; loaded from
    the corpus cache, or rebuilt).

    `make_tables` builds the tables the model reads; rows it keeps elsewhere (tables.* entries
    the built tables do not hold) are skipped. The file is a pickle: load only files you trust.
    """
    check_device(device)
    saved = saved_model(path)
    if saved.get("service") and make_tables is checkpoint_tables:
        raise ValueError(f"checkpoint {str(path)!r} was trained through the table service (tables "
                         f"{saved['service']['prefix']}/...): its rows live there; attach to it (--address)")
    cfg = train_config_from_dict(saved["config"])
    corpus = Corpus.load(cfg.corpus)
    indexer = build_indexer(cfg, corpus)
    tables = make_tables(cfg.model.engram, indexer.table_sizes()) if indexer is not None else None
    model = EngramLM(replace(cfg.model, vocab_size=corpus.vocab_size), tables, seed=cfg.seed)
    missing, unexpected = model.load_state_dict(saved["model"], strict=False)
    if missing or any(not key.startswith("tables.") for key in unexpected):
        raise ValueError(f"checkpoint {str(path)!r} does not fit its model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(device).eval(), indexer, cfg, corpus


def saved_model(path: str | Path) -> dict:
    """{config, model, service} of a trained model: a file written at the end of training
    (`--checkpoint`), or a checkpoint directory a run wrote to resume from (`--checkpoint-dir`;
    its dense part, checked against its manifest). A file is a pickle: load only files you trust."""
    if Path(path).is_dir():
        from memory_service.durability.checkpoint import dense_state

        saved = dense_state(path)
        run = saved["extra"] or {}
        if "config" not in run:
            raise ValueError(f"checkpoint {str(path)!r} holds no training run's model")
        return {"config": run["config"], "model": saved["model"], "service": run.get("service")}
    return torch.load(path, map_location="cpu", weights_only=False)  # configs hold non-tensor types


def train_config_from_dict(d: dict) -> TrainConfig:
    """The TrainConfig that `dataclasses.asdict` turned into `d` (nested configs are dicts). Its
    device is the CPU: where a run trained says nothing about where its model is read (a GPU run's
    config would not even build on a machine without one); `load_checkpoint` takes the device."""
    m = d["model"]
    engram = EngramConfig(**m["engram"]) if m["engram"] is not None else None
    model = ModelConfig(**{**m, "engram": engram})
    return TrainConfig(**{**d, "model": model, "corpus": CorpusConfig(**d["corpus"]), "device": "cpu"})

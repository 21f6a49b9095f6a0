"""Generation speed with the Engram tables in-process vs read from the table service.

The demo's model (`tiny` preset, context 128) with identical rows in both (the service's initial
rows equal the in-process tables'), cached decoding, greedy, a 16-token prompt and `--new` new
tokens, at batch 1 and 16. Per new token the service serves B x H rows per Engram layer (B x 8
here: ~1 KiB at batch 1): the fetch is latency-bound, so the look-ahead that hides it is sending
the request as soon as the token is sampled, while the blocks before the first Engram layer run.
Baseline: the same generation with in-process tables, same process. The tokens must be equal.

Prints tokens/s per (batch, tables) and remote/local; `--json`: one object with `tokens_per_s`
{"local_b1", "remote_b1", "local_b16", "remote_b16"} and the ratios.

`--device cuda` generates on the GPU (both models; remote rows are copied there as they arrive;
each timing ends with a device synchronisation). `--cluster processes` starts the shards as plain
local processes instead of Ray actors (bench/shard_processes.py: for a machine without Ray).

    python bench/bench_generate.py [--new 64] [--repeats 3] [--json]
    python bench/bench_generate.py --device cuda --cluster processes --json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from memory_service.server.shard_process import SHARD_ENV, reexec_with
from trainer import colocation

colocation.apply()  # it trains beside its shards (the re-exec below keeps what this sets)
reexec_with(SHARD_ENV)

import torch  # noqa: E402

from shard_processes import start_embedded  # noqa: E402  (bench/, beside this script)
from trainer.data import Corpus, CorpusConfig  # noqa: E402
from trainer.infer import generate  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.train import DEVICES, TrainConfig, build, remote_tables  # noqa: E402


def timed(model, indexer, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-`repeats` new tokens per second, and the tokens (on the model's device)."""
    best = float("inf")
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        tokens = generate(model, indexer, prompt, new)
        sync()
        best = min(best, time.perf_counter() - start)
    return prompt.shape[0] * new / best, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the models generate")
    p.add_argument("--cluster", default="ray", choices=("ray", "processes"),
                   help="shards as Ray actors (start_local) or plain local processes (no Ray needed)")
    p.add_argument("--corpus", default=None, help="folder of text/source files (default: Python stdlib)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = TrainConfig(model=replace(ModelConfig.from_name("tiny"), context=128),
                      corpus=CorpusConfig(corpus_dir=args.corpus), progress=False, device=args.device)
    corpus = Corpus.load(cfg.corpus)
    local_model, indexer, _ = build(cfg, corpus)
    local_model.to(args.device).eval()
    val = torch.from_numpy(corpus.val[:16 * 16].astype("int64")).view(16, 16).to(args.device)  # 16 prompts of 16 tokens
    out: dict = {"preset": "tiny", "new_tokens": args.new, "prompt_tokens": 16, "device": args.device,
                 "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "cluster": args.cluster, "tokens_per_s": {}}
    cluster, _, _ = start_embedded(args.cluster, args.device, "bench-generate")
    try:
        with cluster.client() as client:
            remote_model, _, _ = build(cfg, corpus, remote_tables(client, cfg, read_only=True))
            remote_model.load_state_dict(local_model.state_dict(), strict=False)  # same dense weights
            remote_model.to(args.device).eval()
            for batch in (1, 16):
                prompt = val[:batch]
                local_tps, local_tokens = timed(local_model, indexer, prompt, args.new, args.repeats)
                remote_tps, remote_tokens = timed(remote_model, indexer, prompt, args.new, args.repeats)
                if not torch.equal(local_tokens, remote_tokens):
                    raise AssertionError(f"batch {batch}: remote tables generated other tokens than local ones")
                out["tokens_per_s"][f"local_b{batch}"] = local_tps
                out["tokens_per_s"][f"remote_b{batch}"] = remote_tps
                out[f"remote_over_local_b{batch}"] = remote_tps / local_tps
                if not args.json:
                    print(f"batch {batch:>2}: local {local_tps:7.1f} tokens/s, remote {remote_tps:7.1f} tokens/s "
                          f"({remote_tps / local_tps:.2f}x)", flush=True)
    finally:
        cluster.shutdown()
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""Local training end to end on a real (small) corpus, and the `engram train-local` command."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.data import CorpusConfig
from trainer.engram import EngramConfig
from trainer.model import ModelConfig
from trainer.train import TrainConfig, lr_at, train


def small_train_config(corpus_dir: Path, tmp_path: Path, **kw) -> TrainConfig:
    e = EngramConfig(hidden_size=32, num_branches=2, max_ngram=3, heads_per_ngram=2, d_mem=16,
                     table_sizes=(1009, 1009), layer_ids=(0,), init_scale=0.1)
    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64, context=32,
                        num_branches=2, engram=e)
    corpus = CorpusConfig(corpus_dir=str(corpus_dir), vocab_size=512, cache_dir=str(tmp_path / "cache"))
    return TrainConfig(model=model, corpus=corpus, steps=30, batch_size=8, warmup_steps=3, eval_batches=2,
                       progress=False, **kw)


def test_training_lowers_loss_and_checkpoints(corpus_dir, tmp_path):
    ckpt = tmp_path / "model.pt"
    result = train(small_train_config(corpus_dir, tmp_path, checkpoint=str(ckpt)))
    first, last = sum(result.train_losses[:3]) / 3, sum(result.train_losses[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert result.val_loss < first
    saved = torch.load(ckpt, weights_only=False)
    assert saved["config"]["steps"] == 30
    assert any(k.startswith("tables.embeddings.0") for k in saved["model"])
    assert len(saved["optimizers"]) == 2  # AdamW on the backbone, the table optimizer
    assert "smaller" in result.compression


def test_same_seed_same_result(corpus_dir, tmp_path):
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=4, warmup_steps=1)
    assert train(cfg).train_losses == train(cfg).train_losses


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="warmup_steps 5 must be in"):
        TrainConfig(steps=5, warmup_steps=5)


def test_cli_train_local(corpus_dir, tmp_path, capsys):
    ckpt = tmp_path / "cli.pt"
    assert main(["train-local", "--corpus", str(corpus_dir), "--steps", "2", "--batch-size", "2",
                 "--context", "32", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "tokenizer compression" in out and ckpt.exists()


def test_device_is_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"device 'gpu' must be one of \('cpu', 'cuda'\)"):
        TrainConfig(device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    with pytest.raises(ValueError, match="device 'cuda' needs a GPU"):
        TrainConfig(device="cuda")


def test_a_gpu_runs_config_loads_on_the_cpu(monkeypatch):
    """Where a run trained says nothing about where its checkpoint is read."""
    from dataclasses import asdict

    from trainer.infer import train_config_from_dict

    saved = asdict(TrainConfig(steps=7, warmup_steps=2))
    saved["device"] = "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = train_config_from_dict(saved)
    assert cfg.device == "cpu" and cfg.steps == 7


@pytest.mark.gpu
def test_training_on_cuda_agrees_with_cpu_and_its_checkpoint_generates_there(corpus_dir, tmp_path):
    """8 steps with in-process tables on the GPU (rows, hashing, Triton Engram kernels there; the
    table optimizer's math on the host) take the CPU run's losses within float tolerance."""
    from trainer.infer import generate, load_checkpoint

    ckpt = tmp_path / "cuda.pt"
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=8, warmup_steps=1)
    on_gpu = train(replace(cfg, device="cuda", checkpoint=str(ckpt)))
    on_cpu = train(cfg)
    torch.testing.assert_close(torch.tensor(on_gpu.train_losses), torch.tensor(on_cpu.train_losses),
                               rtol=1e-3, atol=1e-4)
    assert on_gpu.val_loss == pytest.approx(on_cpu.val_loss, rel=1e-3)
    saved = torch.load(ckpt, weights_only=False)["model"]
    assert saved["embed.weight"].is_cuda and saved["tables.embeddings.0.weight"].is_cuda
    model, indexer, _, _ = load_checkpoint(ckpt, device="cuda")
    out = generate(model, indexer, torch.tensor([[5, 6, 7]]), max_new_tokens=4)  # a host prompt
    assert out.is_cuda and out.shape == (1, 7) and out[0, :3].tolist() == [5, 6, 7]

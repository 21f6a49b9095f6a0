"""A small decoder with M residual branches (static hyper-connections) and Engram layers.

Blocks: RMSNorm, rotary attention (SDPA), SwiGLU MLP. The residual stream is M branches
H (B, T, M, D) joined by static hyper-connections (Zhu et al., 2024): per sublayer, learned read
weights over the branches form its input, learned write weights add its output back to each
branch, and a learned M x M matrix mixes the branches. At init (read = one-hot, mix = identity,
write = ones, branches started equal) every branch carries the same stream, so an M-branch model
computes what the M=1 model computes; training then breaks the symmetry. Engram layers add
Y = Engram(H, rows) to every branch before the block's attention (ENGRAM.md §3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from trainer.decode_cache import DecodeCache
from trainer.engram import Engram, EngramConfig, EngramTables


@dataclass(frozen=True)
class ModelConfig:
    """Backbone sizes. `engram=None` is the baseline; `mlp_extra_layers` widen the MLP of those
    blocks by `mlp_extra` units (how the iso-FLOPs baseline spends Engram's projection FLOPs)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_hidden: int = 688
    context: int = 256
    num_branches: int = 4
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    mlp_extra: int = 0
    mlp_extra_layers: tuple[int, ...] = ()
    engram: EngramConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_extra_layers", tuple(self.mlp_extra_layers))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_hidden", "context",
                     "num_branches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size")
        if any(not 0 <= l < self.num_layers for l in self.mlp_extra_layers):
            raise ValueError(f"mlp_extra_layers {self.mlp_extra_layers} outside [0, {self.num_layers})")
        if self.engram is not None:
            e = self.engram
            if (e.hidden_size, e.num_branches) != (self.hidden_size, self.num_branches):
                raise ValueError(f"engram hidden/branches ({e.hidden_size}, {e.num_branches}) differ from the "
                                 f"model's ({self.hidden_size}, {self.num_branches})")
            if any(not 0 <= l < self.num_layers for l in e.layer_ids):
                raise ValueError(f"engram layer_ids {e.layer_ids} outside [0, {self.num_layers})")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    def iso_flops_baseline(self) -> "ModelConfig":
        """The same backbone without Engram, its MLPs at Engram layers widened by the FLOPs of
        Engram's projections ((M + 1) * E * D multiply-adds per token; SwiGLU costs 3 * D per unit)."""
        if self.engram is None:
            return self
        e = self.engram
        extra = round((e.num_branches + 1) * e.retrieved_width / 3)
        return replace(self, engram=None, mlp_extra=extra, mlp_extra_layers=e.layer_ids)


MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, mlp_hidden=688,
                 context=256, num_branches=4, engram=EngramConfig.from_name("tiny")),
    "demo": dict(vocab_size=129280, hidden_size=1024, num_layers=30, num_heads=16, mlp_hidden=2816,
                 context=4096, num_branches=4, engram=EngramConfig.from_name("demo")),
}


class HyperConnection(nn.Module):
    """Static hyper-connection around one sublayer: read (M,), write (M,), mix (M, M)."""

    def __init__(self, num_branches: int, index: int):
        super().__init__()
        self.read_weights = nn.Parameter(F.one_hot(torch.tensor(index % num_branches), num_branches).float())
        self.write_weights = nn.Parameter(torch.ones(num_branches))
        self.mix = nn.Parameter(torch.eye(num_branches))

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btmd,m->btd", h, self.read_weights)  # (B, T, D)

    def write(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("btmd,mn->btnd", h, self.mix)  # (B, T, M, D)
        return mixed + out.unsqueeze(2) * self.write_weights[:, None]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated by position; cos, sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: DecodeCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); cos, sin (T, hs/2) at the tokens' positions. With a cache, the
        tokens follow the cached ones: their keys and values join block `layer`'s cached ones."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)  # (B, T, nh, hs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True)
        else:
            k, v = cache.store_kv(layer, rotary(k, cos, sin), v)  # (B, nh, position + T, hs)
            y = F.scaled_dot_product_attention(rotary(q, cos, sin), k, v,
                                               attn_mask=cache.attention_mask(T, x.device))
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.engram = Engram(cfg.engram) if cfg.engram and index in cfg.engram.layer_ids else None
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        extra = cfg.mlp_extra if index in cfg.mlp_extra_layers else 0
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_hidden + extra)
        self.attn_hc = HyperConnection(cfg.num_branches, 2 * index)
        self.mlp_hc = HyperConnection(cfg.num_branches, 2 * index + 1)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: torch.Tensor | None, cache: DecodeCache | None = None) -> torch.Tensor:
        """h (B, T, M, D) -> (B, T, M, D); rows (B, T, E) at an Engram layer. With a cache, the
        T tokens continue the cached sequence and the cache takes this block's new state."""
        if self.engram is not None:
            h = h + self.engram_output(h, rows, cache)  # (B, T, M, D)
        attn_out = self.attn(self.attn_norm(self.attn_hc.read(h)), cos, sin, cache, self.index)
        h = self.attn_hc.write(h, attn_out)
        return self.mlp_hc.write(h, self.mlp(self.mlp_norm(self.mlp_hc.read(h))))

    def engram_output(self, h: torch.Tensor, rows: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
        """Y (B, T, M, D) of this block's Engram; with a cache, its conv continues from the cached
        inputs and the cache takes the new ones."""
        if cache is None:
            return self.engram(h, rows)
        out, cache.conv_inputs[self.index] = self.engram.decode(h, rows, cache.conv_inputs[self.index])
        return out


class EngramLM(nn.Module):
    """Decoder LM. forward(tokens (B, T), row_ids {layer: (B, T, H)}) -> logits (B, T, V);
    with a DecodeCache (`new_cache`) the tokens continue the cached sequence (trainer/infer.py).

    Row ids are computed outside (trainer/hashing.py) because they depend only on the tokens:
    that is what lets a caller prefetch rows before the forward pass."""

    def __init__(self, cfg: ModelConfig, tables: EngramTables | None = None, seed: int = 0):
        super().__init__()
        if (cfg.engram is None) != (tables is None):
            raise ValueError("an Engram model needs tables and a baseline takes none")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.final_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tables = tables
        self.reset_parameters(seed)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        hs = cfg.hidden_size // cfg.num_heads
        inv_freq = cfg.rope_theta ** (-torch.arange(0, hs, 2).float() / hs)  # (hs/2,)
        angles = torch.outer(torch.arange(cfg.context).float(), inv_freq)  # (context, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 L), drawn from a
        generator of `seed` in a fixed order that does not depend on M, so models that differ only
        in M start from the same draws. Hyper-connections have a fixed init (see their class)."""
        std, g = 0.02, torch.Generator().manual_seed(seed)
        nn.init.normal_(self.embed.weight, std=std, generator=g)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.mlp.gate_up):
                nn.init.normal_(lin.weight, std=std, generator=g)
            for lin in (block.attn.out, block.mlp.down):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.cfg.num_layers), generator=g)
            if block.engram is not None:
                block.engram.reset_parameters(std, g)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std, generator=g)

    def forward(self, tokens: torch.Tensor, row_ids: dict[int, torch.Tensor] | None = None,
                cache: DecodeCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) of `tokens` (B, T). With a cache they are positions [position,
        position + T) of the cached sequence (the cache advances by T), and the logits equal the
        full forward's there; row_ids are then those of these T tokens only (RowIndexer.extend)."""
        B, T = tokens.shape
        start = 0 if cache is None else cache.position
        if start + T > self.cfg.context:
            raise ValueError(f"sequence length {start + T} exceeds the context {self.cfg.context}"
                             + (f" ({start} cached + {T} new)" if cache is not None else ""))
        if cache is not None:
            cache.check_room(B, T)
        h = self.embed(tokens).unsqueeze(2).expand(B, T, self.cfg.num_branches, -1)  # (B, T, M, D)
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # (T, hs/2)
        for i, block in enumerate(self.blocks):
            rows = None
            if block.engram is not None:
                if row_ids is None or i not in row_ids:
                    raise ValueError(f"Engram layer {i} needs row ids; got layers {sorted(row_ids or {})}")
                rows = self.tables.lookup(i, row_ids[i])  # (B, T, E)
            h = block(h, cos, sin, rows, cache)
        if cache is not None:
            cache.position += T
        return self.lm_head(self.final_norm(h.mean(dim=2)))  # (B, T, V)

    def new_cache(self, batch_size: int, capacity: int | None = None,
                  recent_ids: torch.Tensor | None = None) -> DecodeCache:
        """An empty DecodeCache for `batch_size` sequences of up to `capacity` tokens (default:
        the context), on the model's device and dtype. An Engram model needs `recent_ids`
        (B, max_ngram - 1) from RowIndexer.initial_recent_ids; a baseline takes none."""
        cfg = self.cfg
        capacity = cfg.context if capacity is None else capacity
        if not 1 <= capacity <= cfg.context:
            raise ValueError(f"cache capacity {capacity} must be in [1, context {cfg.context}]")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        if (recent_ids is None) != (cfg.engram is None):
            raise ValueError("an Engram model's cache needs recent_ids and a baseline's takes none")
        if recent_ids is not None and tuple(recent_ids.shape) != (batch_size, cfg.engram.max_ngram - 1):
            raise ValueError(f"recent_ids shape {tuple(recent_ids.shape)} must be "
                             f"({batch_size}, {cfg.engram.max_ngram - 1})")
        weight = self.embed.weight
        kv_shape = (batch_size, cfg.num_heads, capacity, cfg.hidden_size // cfg.num_heads)
        keys = [weight.new_empty(kv_shape) for _ in self.blocks]  # read only where written
        values = [weight.new_empty(kv_shape) for _ in self.blocks]
        conv_inputs = {  # zeros: what the full forward's left padding feeds the conv
            i: weight.new_zeros(batch_size, cfg.num_branches * cfg.hidden_size, b.engram.num_past_inputs)
            for i, b in enumerate(self.blocks) if b.engram is not None}
        return DecodeCache(keys, values, conv_inputs, recent_ids)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything but the Engram tables (those get a sparse optimizer of their own)."""
        table_ids = {id(p) for p in self.tables.parameters()} if self.tables is not None else set()
        return [p for p in self.parameters() if id(p) not in table_ids]

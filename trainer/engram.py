"""The Engram module: hashed N-gram rows, gated by the hidden state, fused into the residual.

ENGRAM.md §3. Per position t the row ids of every (order n, head k) table are known from the
tokens alone (trainer/hashing.py); the rows are concatenated into e_t, projected to a key and a
value, and each of the M residual branches gates the shared value with its own key and norms:

    alpha_m = sigmoid(s(RMSNorm_h,m(h_m) . RMSNorm_k,m(W_K,m e) / sqrt(D))),  s(x) = sign(x) sqrt(|x|)
    v~_m    = alpha_m * W_V e
    Y_m     = SiLU(CausalDepthwiseConv(RMSNorm_m(v~_m))) + v~_m       (kernel 4, dilation = max_ngram)

The tables sit behind `EngramTables`, so the module never changes when rows move out of process.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from memory_service.rows import init_rows, table_seed
from trainer.kernels import reference, triton_installed


@dataclass(frozen=True)
class EngramConfig:
    """Sizes of the Engram layers of one model. `table_sizes` is per N-gram order n = 2..max_ngram;
    the hashing rounds each head's size up to a distinct prime."""

    hidden_size: int = 1024
    num_branches: int = 4
    max_ngram: int = 3
    heads_per_ngram: int = 8
    d_mem: int = 512  # retrieved width per N-gram order; each head's row is d_mem / heads wide
    table_sizes: tuple[int, ...] = (129280 * 5, 129280 * 5)
    layer_ids: tuple[int, ...] = (1, 15)
    kernel_size: int = 4
    use_gate: bool = True  # False: the ablation that adds the value ungated
    init_scale: float = 1.0  # std of the initial rows (nn.Embedding's default is 1)
    seed: int = 0  # hashing seed and base of every table's init seed

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_sizes", tuple(self.table_sizes))
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        if self.max_ngram < 2:
            raise ValueError(f"max_ngram {self.max_ngram} must be >= 2")
        if len(self.table_sizes) != self.max_ngram - 1:
            raise ValueError(f"table_sizes {self.table_sizes} needs one size per order 2..{self.max_ngram}")
        if self.d_mem % self.heads_per_ngram:
            raise ValueError(f"d_mem {self.d_mem} must be a multiple of heads_per_ngram {self.heads_per_ngram}")
        for name in ("hidden_size", "num_branches", "heads_per_ngram", "d_mem", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale {self.init_scale} must be > 0")

    @property
    def num_heads(self) -> int:
        """Tables per Engram layer: one per (order, head)."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    @property
    def head_width(self) -> int:
        return self.d_mem // self.heads_per_ngram

    @property
    def retrieved_width(self) -> int:
        """Width of e_t: (max_ngram - 1) * d_mem."""
        return (self.max_ngram - 1) * self.d_mem

    @classmethod
    def from_name(cls, name: str, **overrides) -> "EngramConfig":
        if name not in ENGRAM_PRESETS:
            raise ValueError(f"unknown Engram preset {name!r}; known: {sorted(ENGRAM_PRESETS)}")
        return cls(**{**ENGRAM_PRESETS[name], **overrides})


ENGRAM_PRESETS: dict[str, dict] = {
    # The reference demo (engram_demo_v1.py).
    "demo": dict(hidden_size=1024, num_branches=4, max_ngram=3, heads_per_ngram=8, d_mem=512,
                 table_sizes=(129280 * 5, 129280 * 5), layer_ids=(1, 15), seed=0),
    # Trains on 2 CPU cores: the quality benchmark's size.
    # init_scale 0.05: with N(0, 1) rows the projected value (std ~0.3) swamped a residual stream
    # of std 0.02 and the Engram model trailed the baseline by 4% at 100 steps; 0.05 fixed that.
    "tiny": dict(hidden_size=256, num_branches=4, max_ngram=3, heads_per_ngram=4, d_mem=128,
                 table_sizes=(100_000, 100_000), layer_ids=(1,), init_scale=0.05, seed=0),
}


class EngramTables(nn.Module):
    """Where rows live. `lookup(layer, row_ids)`: (B, T, H) int64 -> (B, T, H * head_width).

    `prefetch(row_ids, min_step)` announces the row ids {layer: (B, T, H)} of a coming forward as
    soon as the tokens are known, so tables that live elsewhere can start fetching (as of table
    step `min_step`, default the latest); in-process tables ignore it.
    """

    wants_ngrams = False  # True: `prefetch` takes the N-gram fingerprints (collision stats)

    def prefetch(self, row_ids: dict[int, torch.Tensor], min_step: int | None = None,
                 ngrams: dict[int, "np.ndarray"] | None = None) -> None:
        return None

    def announce(self, row_ids: dict[int, torch.Tensor], min_step: int | None = None) -> None:
        """Row ids {layer: (B, T, H)} a later step will read, known early: a placement hint that
        in-process tables ignore. `min_step`: what that step's `prefetch` will pass (None: not
        known; it is then read after the steps announced before)."""
        return None

    def lookup(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(layer, row_ids)


class LocalTables(EngramTables):
    """All (order, head) tables of each Engram layer in-process, as one embedding per layer whose
    rows are the heads' tables laid end to end (one gather per layer instead of H).

    `sparse=True` gives the sparse gradients `torch.optim.SparseAdam` needs; initial rows come from
    `memory_service.rows.init_rows`, so they equal the table service's rows for the same seed.
    `initialize_rows=False` leaves them uninitialised for a caller that loads them next (a
    checkpoint): computing initial rows costs seconds per million.
    """

    def __init__(self, cfg: EngramConfig, sizes: dict[int, list[int]], sparse: bool = True,
                 dtype: torch.dtype = torch.float32, initialize_rows: bool = True):
        super().__init__()
        self.cfg = cfg
        self.sizes = {layer: list(s) for layer, s in sizes.items()}
        # Called as hook(weight, ids) before each gather: dense-equivalent Adam catches rows up there.
        self.read_hooks: list[Callable[[torch.Tensor, torch.Tensor], None]] = []
        self.embeddings = nn.ModuleDict()
        for layer, layer_sizes in self.sizes.items():
            if len(layer_sizes) != cfg.num_heads:
                raise ValueError(f"layer {layer}: {len(layer_sizes)} table sizes, expected {cfg.num_heads}")
            offsets = torch.tensor(np.cumsum([0] + layer_sizes[:-1]), dtype=torch.int64)  # (H,)
            self.register_buffer(f"offsets_{layer}", offsets, persistent=False)
            emb = nn.utils.skip_init(nn.Embedding, sum(layer_sizes), cfg.head_width, sparse=sparse, dtype=dtype)
            if initialize_rows:
                with torch.no_grad():
                    emb.weight.copy_(torch.from_numpy(self.initial_rows(layer)))
            self.embeddings[str(layer)] = emb

    def initial_rows(self, layer: int) -> np.ndarray:
        """(sum of sizes, head_width) float32: each head's table from its own seed."""
        return np.concatenate([
            init_rows(table_seed(self.cfg.seed, layer, head), np.arange(size), self.cfg.head_width,
                      self.cfg.init_scale)
            for head, size in enumerate(self.sizes[layer])
        ])

    def lookup(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        offsets = getattr(self, f"offsets_{layer}")  # (H,)
        emb, ids = self.embeddings[str(layer)], row_ids + offsets  # (B, T, H)
        for hook in self.read_hooks:
            hook(emb.weight, ids)
        rows = emb(ids)  # (B, T, H, w)
        return rows.flatten(-2)  # (B, T, H * w)


class Engram(nn.Module):
    """One Engram layer over M residual branches. forward(hidden (B, T, M, D), rows (B, T, E))
    returns Y (B, T, M, D), to be added to the residual: H <- H + Y.

    `kernels` picks the code around the projections: "auto" runs the fused Triton kernels
    (trainer/kernels/gating.py) on CUDA tensors and elsewhere their PyTorch reference
    (trainer/kernels/reference.py, through `gates` / `value_path`); "triton" and "torch" force one.
    It is a plain attribute, so a built model can be switched."""

    KERNELS = ("auto", "triton", "torch")
    NORM_EPS = 1e-6  # of every branch norm (query, key, value)

    def __init__(self, cfg: EngramConfig, kernels: str = "auto"):
        super().__init__()
        if kernels not in self.KERNELS:
            raise ValueError(f"kernels {kernels!r} must be one of {self.KERNELS}")
        self.cfg = cfg
        self.kernels = kernels
        D, M, E = cfg.hidden_size, cfg.num_branches, cfg.retrieved_width
        # One fused projection: rows [0, D) are W_V (shared), then M blocks of W_K (one per branch).
        self.proj = nn.Linear(E, (M + 1) * D, bias=False)
        self.key_norms = nn.ModuleList([nn.RMSNorm(D, eps=self.NORM_EPS) for _ in range(M)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(D, eps=self.NORM_EPS) for _ in range(M)])
        self.value_norms = nn.ModuleList([nn.RMSNorm(D, eps=self.NORM_EPS) for _ in range(M)])
        # Holds the depthwise weight (M*D, 1, K); the causal conv itself is reference.causal_conv.
        dilation = cfg.max_ngram
        self.conv = nn.Conv1d(M * D, M * D, cfg.kernel_size, groups=M * D, bias=False,
                              padding=(cfg.kernel_size - 1) * dilation, dilation=dilation)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """W_V and one W_K drawn, the W_K copied to every branch so an M-branch model starts as the
        M=1 model (same random draws whatever M); conv zero so the module starts as the gated value."""
        D, M = self.cfg.hidden_size, self.cfg.num_branches
        with torch.no_grad():
            w = self.proj.weight.view(M + 1, D, -1)  # (M+1, D, E)
            nn.init.normal_(w[0], std=std, generator=generator)
            nn.init.normal_(w[1], std=std, generator=generator)
            w[2:] = w[1]
            nn.init.zeros_(self.conv.weight)

    @staticmethod
    def norm_weights(norms: nn.ModuleList) -> list[torch.Tensor]:
        """The M branch norms' weights, (D,) each: the (M, D) the reference takes, unstacked."""
        return [n.weight for n in norms]

    def gates(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """hidden, keys (B, T, M, D) -> alpha (B, T, M, 1)."""
        return reference.gate(hidden, keys, self.norm_weights(self.query_norms),
                              self.norm_weights(self.key_norms), self.NORM_EPS)

    @property
    def num_past_inputs(self) -> int:
        """(kernel_size - 1) * dilation: how many earlier positions the causal conv reads."""
        return (self.cfg.kernel_size - 1) * self.cfg.max_ngram

    def value_path(self, gated: torch.Tensor) -> torch.Tensor:
        """v~ (B, T, M, D) -> SiLU(conv(RMSNorm(v~))) + v~, causal along T."""
        return reference.value_path(gated, self.norm_weights(self.value_norms), self.conv.weight,
                                    self.cfg.max_ngram, self.NORM_EPS)

    def gated_value(self, hidden: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, M, D), projected (B, T, M+1, D) -> v~ (B, T, M, D): each branch's gate
        times the shared value (the value alone in the no-gate ablation)."""
        if self.cfg.use_gate:
            return reference.gated_value(hidden, projected, self.norm_weights(self.query_norms),
                                         self.norm_weights(self.key_norms), self.NORM_EPS)
        return projected[:, :, :1].expand(hidden.shape)  # (B, T, M, D)

    def project(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T, E) -> [W_V e, W_K,1 e, ..., W_K,M e] (B, T, M+1, D), after checking that
        hidden (B, T, M, D) has this layer's branches and width."""
        B, T, M, D = hidden.shape
        if M != self.cfg.num_branches or D != self.cfg.hidden_size:
            raise ValueError(f"hidden {tuple(hidden.shape)} does not match M={self.cfg.num_branches}, "
                             f"D={self.cfg.hidden_size}")
        return self.proj(rows.to(hidden.dtype)).view(B, T, M + 1, D)

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        projected = self.project(hidden, rows)  # (B, T, M+1, D)
        if self.uses_triton(hidden):
            return self.fused_forward(hidden, projected)
        return self.value_path(self.gated_value(hidden, projected))

    def decode(self, hidden: torch.Tensor, rows: torch.Tensor,
               past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` over new positions of a sequence whose earlier conv inputs are `past`.

        hidden (B, T, M, D), rows (B, T, E), past (B, M*D, num_past_inputs): the normalised values
        of the positions just before these (zeros before the start, as the conv's padding) ->
        (Y (B, T, M, D), the new past). Always the PyTorch path: the Triton value-path kernel
        reads whole sequences from position 0.
        """
        gated = self.gated_value(hidden, self.project(hidden, rows))  # (B, T, M, D)
        return reference.value_path_step(gated, past, self.norm_weights(self.value_norms), self.conv.weight,
                                         self.cfg.max_ngram, self.NORM_EPS)

    def uses_triton(self, hidden: torch.Tensor) -> bool:
        """Whether forward runs the Triton kernels for this input (see `kernels`)."""
        # float64 (gradcheck) has no kernel, and without triton (an optional extra) there is none:
        # "auto" leaves both to PyTorch
        return self.kernels == "triton" or (self.kernels == "auto" and hidden.is_cuda
                                            and hidden.dtype != torch.float64 and triton_installed())

    def fused_forward(self, hidden: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """forward after the projection, in the fused kernels: hidden (B, T, M, D), projected
        (B, T, M+1, D) -> Y (B, T, M, D), the same as `gates` and `value_path`."""
        from trainer.kernels import gating  # imports Triton only once a kernel runs

        if self.cfg.use_gate:
            wq = torch.stack(self.norm_weights(self.query_norms))  # (M, D)
            wk = torch.stack(self.norm_weights(self.key_norms))  # (M, D)
            gated = gating.fused_gate(hidden, projected, wq, wk, self.NORM_EPS)  # (B, T, M, D)
        else:
            gated = projected[:, :, :1].expand(hidden.shape)  # (B, T, M, D)
        wv = torch.stack(self.norm_weights(self.value_norms))  # (M, D)
        return gating.fused_value_path(gated, wv, self.conv.weight, self.cfg.max_ngram, self.NORM_EPS)

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the projections: what an iso-FLOPs baseline must spend elsewhere."""
        cfg = self.cfg
        return 2 * cfg.retrieved_width * (cfg.num_branches + 1) * cfg.hidden_size
